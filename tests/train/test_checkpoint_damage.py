"""A damaged newest checkpoint: one short paragraph, set aside, resume from the one before it.

One tiny DPO run of 6 steps (checkpoints 2, 4, 6) is trained once, uninterrupted; each test
damages a copy of its directory and runs the same config there again, in-process, with stdout
and stderr captured at the file descriptors (orbax's and TensorStore's noise included).
"""

import json
import os
import shutil

import pytest

from prefopt_jax.errors import RestoreError
from prefopt_jax.train import build, loop, metrics, optim
from prefopt_jax.train.checkpoint import Checkpointer

MODEL = loop.ModelSpec(overrides={"num_layers": 1})
DATA = loop.DataSpec(batch_size=4, tiny_examples=8)
ALGO = build.AlgoConfig(loss="dpo")
OPT = optim.OptimConfig(learning_rate=1e-2, schedule="constant")
WALL_CLOCK = {"time", "elapsed", "tokens_per_second", "tok/s"}  # none today; never compared
NOISE = ("Traceback", "Event loop is closed", "WARNING:absl", "ERROR:asyncio", "tensorstore_spec")
# A failed restore's abandoned coroutines report errors and "never awaited" warnings when
# collected; outside pytest they print to stderr, here they fail the test.
pytestmark = [pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("error:coroutine:RuntimeWarning")]


def train(out_dir, model=MODEL):
    loop.train(model, DATA, ALGO, OPT, loop.LoopConfig(
        steps=6, checkpoint_every=2, output_dir=str(out_dir), export=False))


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
                for line in f]


def steps_in(directory):
    return sorted(int(n) for n in os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    train(out)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    assert steps_in(out / "checkpoints") == [2, 4, 6]
    return out


def copy_run(clean, tmp_path):
    """The finished run's directory as a restartable one (no export, not marked finished)."""
    run = tmp_path / "run"
    shutil.copytree(clean, run)
    shutil.rmtree(run / "export", ignore_errors=True)
    for name in ("finished.json", ".prefopt.lock"):
        if (run / name).exists():
            os.remove(run / name)
    return run


def truncate_array_file(step_dir):
    """The largest array data file of the step, cut to 100 bytes."""
    data = step_dir / "state" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    assert biggest.stat().st_size > 1000
    os.truncate(biggest, 100)
    return biggest.relative_to(step_dir)


def delete_manifest(step_dir):
    os.remove(step_dir / "state" / "manifest.ocdbt")
    return None


@pytest.fixture
def spies(monkeypatch):
    """The step `restore_latest` returned and the metric steps written, for this test."""
    seen = {"restored": [], "written": []}
    restore_latest, write = Checkpointer.restore_latest, metrics.MetricsWriter.write

    def spy_restore(self, *a, **k):
        out = restore_latest(self, *a, **k)
        seen["restored"].append(None if out is None else out[0])
        return out

    def spy_write(self, step, values):
        seen["written"].append(step)
        return write(self, step, values)

    monkeypatch.setattr(Checkpointer, "restore_latest", spy_restore)
    monkeypatch.setattr(metrics.MetricsWriter, "write", spy_write)
    return seen


@pytest.mark.parametrize("damage, why", [
    (truncate_array_file, "array file truncated"),
    (delete_manifest, "missing state/manifest.ocdbt"),
])
def test_damaged_newest_step_is_set_aside_and_the_run_resumes_exactly(
        clean, tmp_path, capfd, spies, damage, why):
    run = copy_run(clean, tmp_path)
    damaged_file = damage(run / "checkpoints" / "6")
    capfd.readouterr()
    train(run)
    out, err = capfd.readouterr()

    assert f"checkpoint step 6 is damaged: {why}" in out, out
    assert f"{run / 'checkpoints' / '6'} -> moved to {run / 'checkpoints.damaged'}" in out
    assert out.count("is damaged") == 1
    for noise in NOISE:
        assert noise not in out + err, f"{noise!r} in the run's output:\n{out}{err}"
    # It resumed from step 4 (not from scratch) and logged what the uninterrupted run logged.
    assert spies["restored"] == [4] and spies["written"] == [5, 6]
    assert records(run) == records(clean)
    # The damaged step is kept aside, whole; step 6 was saved again in its place.
    (aside,) = os.listdir(run / "checkpoints.damaged")
    assert aside.startswith("6-")
    if damaged_file is not None:
        assert (run / "checkpoints.damaged" / aside / damaged_file).stat().st_size == 100
    assert steps_in(run / "checkpoints") == [2, 4, 6]


def test_every_step_damaged_raises_restore_error_naming_them(clean, tmp_path, capfd, spies):
    run = copy_run(clean, tmp_path)
    truncate_array_file(run / "checkpoints" / "6")
    delete_manifest(run / "checkpoints" / "4")
    truncate_array_file(run / "checkpoints" / "2")
    capfd.readouterr()
    with pytest.raises(RestoreError) as raised:
        train(run)
    out, err = capfd.readouterr()

    message = str(raised.value)
    assert "step 6: array file truncated" in message, message
    assert "step 4: missing state/manifest.ocdbt;" in message
    assert "step 2: array file truncated" in message
    assert out.count("is damaged") == 3
    for noise in NOISE:
        assert noise not in out + err, f"{noise!r} in the run's output:\n{out}{err}"
    assert steps_in(run / "checkpoints") == []
    assert sorted(n.split("-")[0] for n in os.listdir(run / "checkpoints.damaged")) == \
        ["2", "4", "6"]
    assert spies["written"] == []


def test_checkpoint_of_another_model_is_not_damage_and_stays(clean, tmp_path, capfd):
    """A config change (same leaves, other shapes) raises RestoreError and moves nothing."""
    run = copy_run(clean, tmp_path)
    wider = loop.ModelSpec(overrides={"num_layers": 1, "intermediate_size": 48})
    capfd.readouterr()
    with pytest.raises(RestoreError, match="step 6 .* does not fit this run's state"):
        train(run, model=wider)
    out, err = capfd.readouterr()
    assert "is damaged" not in out
    for noise in NOISE:
        assert noise not in out + err, f"{noise!r} in the run's output:\n{out}{err}"
    assert steps_in(run / "checkpoints") == [2, 4, 6]
    assert not (run / "checkpoints.damaged").exists()

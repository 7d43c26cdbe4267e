"""Run directories: one run at a time, stale locks taken over, finished runs left alone.

The second `prefopt train` on a directory in use is refused naming the first one's pid and host
(the first is proven running, then proven killed: status -9), and the log keeps one run's
steps in order. A finished run started again says so and leaves its outputs untouched;
`LoopConfig.overwrite=True` trains it again from step 0.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from prefopt_jax import cli
from prefopt_jax.errors import RunDirError
from prefopt_jax.train import driver

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["configs/experiments/tiny.gin", "--gin.ModelSpec.overrides={'num_layers': 1}"]


def command(out_dir, *bindings):
    return [sys.executable, "-m", "prefopt_jax.cli", "train", *TINY,
            f"--gin.LoopConfig.output_dir='{out_dir}'", *(f"--gin.{b}" for b in bindings)]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                                       "--xla_backend_optimization_level=0 "
                                       "--xla_cpu_use_fusion_emitters=false",
            "JAX_PLATFORMS": "cpu", "PREFOPT_DEBUG": "0"}


def steps_logged(out_dir) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def test_second_run_on_a_directory_in_use_is_refused_then_a_stale_lock_is_taken(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PREFOPT_DEBUG", raising=False)
    out = tmp_path / "run"
    first = subprocess.Popen(command(out, "LoopConfig.steps=100000",
                                     "LoopConfig.checkpoint_every=0"),
                             cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while len(steps_logged(out)) < 2:  # the first run is training
            if first.poll() is not None or time.time() > deadline:
                pytest.fail("the first run ended or timed out before training")
            time.sleep(0.05)
        operative = (out / "operative_config.gin").read_text()
        # The second run, in this process: `prefopt train` on the same directory.
        assert cli.main(command(out, "LoopConfig.steps=3")[3:]) == 2
        assert (out / "operative_config.gin").read_text() == operative  # nothing written
        message = capsys.readouterr().err.strip()
        assert len(message.splitlines()) <= 5 and "Traceback" not in message, message
        assert f"pid {first.pid} on {socket.gethostname()}" in message, message
        assert "in use by another run" in message, message
        assert first.poll() is None, "the first run stopped"
    finally:
        first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    logged = steps_logged(out)
    assert logged == list(range(1, len(logged) + 1)), logged  # one run's steps, in order
    # The killed run's record stays in the lock file; the next run takes over with a warning.
    with driver.RunDir(str(out)) as held:
        assert json.loads(open(held.lock_path).read())["pid"] == os.getpid()
    assert open(held.lock_path).read() == ""  # a clean end leaves no holder behind


def test_stale_lock_warns_and_a_held_one_refuses(tmp_path, capsys):
    lock = tmp_path / driver.LOCK_FILE
    lock.write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "then"}))
    (tmp_path / "metrics.jsonl").write_text("")  # a run's output: the directory stays
    with driver.RunDir(str(tmp_path)):
        assert "taking over" in capsys.readouterr().out
        with driver.RunDir(str(tmp_path)):  # the same process claims again: nested, fine
            pass
        holder = subprocess.run([sys.executable, "-c", (
            "import sys; from prefopt_jax.train import driver\n"
            f"driver.RunDir({str(tmp_path)!r}).__enter__()")], capture_output=True, text=True)
        assert holder.returncode != 0 and "in use by another run" in holder.stderr
        assert f"pid {os.getpid()}" in holder.stderr
    with pytest.raises(RunDirError, match="in use"):  # a second holder in this process
        import fcntl
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with driver.RunDir(str(tmp_path)):
                pass


def test_finished_run_is_left_alone_unless_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    argv = ["train", *TINY, f"--gin.LoopConfig.output_dir='{out}'"]
    assert cli.main(argv) == 0
    assert f"outputs in {out}" in capsys.readouterr().out
    weights = out / "export" / "model.safetensors"
    run = json.loads((out / "export" / "prefopt_run.json").read_text())  # the export's origin
    assert run["base_model"] == "tiny" and run["objective"] == "dpo" and run["steps"] == 2
    assert "LoopConfig.output_dir = " in (out / "export" / "operative_config.gin").read_text()
    before = (weights.read_bytes(), os.stat(weights).st_mtime_ns, steps_logged(out))
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "finished 2 steps already" in said and "step 1/2" not in said, said
    assert (weights.read_bytes(), os.stat(weights).st_mtime_ns, steps_logged(out)) == before
    assert cli.main(argv + ["--gin.LoopConfig.overwrite=True"]) == 0
    said = capsys.readouterr().out
    assert "training again from step 0" in said and "step 1/2" in said, said
    assert os.stat(weights).st_mtime_ns != before[1] and steps_logged(out) == [1, 2]

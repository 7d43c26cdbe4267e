"""A `prefopt train` process killed with SIGKILL and restarted gives the uninterrupted metrics.

The policy loop, the iterative loop killed mid-round (its round's pairs come back from the
run's `rounds/`), the online loop and diffusion objectives, all through the shared driver. Each
kill is proven: the process's exit
status is -9, and a wait that times out fails the test.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(config, out_dir, *bindings):
    return [sys.executable, "-m", "prefopt_jax.cli", "train", config,
            f"--gin.LoopConfig.output_dir='{out_dir}'", *(f"--gin.{b}" for b in bindings)]


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                                       "--xla_backend_optimization_level=0 "
                                       "--xla_cpu_use_fusion_emitters=false",
            "JAX_PLATFORMS": "cpu"}


def kill_when(cmd, ready, timeout=240):
    """Start `cmd`, SIGKILL it once `ready()` holds, and prove the kill landed (status -9)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run {'ended' if proc.returncode is not None else 'timed out'} "
                        "before the kill point")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the SIGKILL did not land mid-run"


def lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_then_restart_equals_uninterrupted(tmp_path):
    steps = 6
    bindings = [f"LoopConfig.steps={steps}", "LoopConfig.checkpoint_every=2",
                "LoopConfig.export=False", "ModelSpec.overrides={'num_layers': 1}",
                "DataSpec.batch_size=4"]
    config = "configs/experiments/dpo_tiny.gin"
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(command(config, clean, *bindings), cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    # Kill once the first checkpoint exists and a later step is logged (mid-run, maybe mid-save).
    kill_when(command(config, killed, *bindings),
              lambda: (killed / "checkpoints" / "2").exists()
              and lines(killed / "metrics.jsonl") >= 3)
    assert lines(killed / "metrics.jsonl") < steps
    newest = max(int(n) for n in os.listdir(killed / "checkpoints") if n.isdigit())
    restart = subprocess.run(command(config, killed, *bindings), cwd=ROOT, env=env(),
                             check=True, capture_output=True, text=True)
    assert records(killed) == records(clean)
    assert [r["step"] for r in records(clean)] == list(range(1, steps + 1))
    # The restart says where it works and where it resumed (the newest complete checkpoint).
    assert f"run directory: {killed}" in restart.stdout
    assert f"resuming from step {newest} " in restart.stdout, restart.stdout


def clean_then_killed_at_step_6(config, tmp_path, bindings):
    """A clean run, and a run SIGKILLed after step 6's checkpoint then restarted to the end."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(command(config, clean, *bindings), cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    kill_when(command(config, killed, *bindings),
              lambda: (killed / "checkpoints" / "6").exists())
    assert lines(killed / "metrics.jsonl") < 12
    interrupted_export = (killed / "export").exists()
    subprocess.run(command(config, killed, *bindings), cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    return clean, killed, interrupted_export


def test_iterative_run_killed_mid_round_resumes_exactly_and_exports(tmp_path):
    """Rounds of 4 steps; killed after step 6's checkpoint (round 1 of 3, half trained)."""
    bindings = ["LoopConfig.steps=12", "LoopConfig.checkpoint_every=2",
                "LoopConfig.keep_checkpoints=2", "ModelSpec.overrides={'num_layers': 1}"]
    clean, killed, interrupted_export = clean_then_killed_at_step_6(
        "configs/experiments/iterative_tiny.gin", tmp_path, bindings)
    assert not interrupted_export
    assert records(killed) == records(clean)
    assert [r["round"] for r in records(clean)] == [0] * 4 + [1] * 4 + [2] * 4
    assert (killed / "export" / "model.safetensors").exists()
    assert sorted(os.listdir(killed / "rounds")) == [f"round_{t:04d}.npz" for t in range(3)]
    with open(killed / "iterations.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [4, 8, 12]


def test_online_run_killed_mid_iteration_resumes_exactly(tmp_path):
    """PPO (the online loop with a critic) in iterations of 4 steps (2 epochs x 2
    mini-batches); killed after step 6's checkpoint, half-way through iteration 1, whose
    rollouts (with the critic's values at sampling time) come back from `rollouts/`, and the
    critic and its optimiser state from the checkpoint; the next iterations are sampled from
    the restored policy with the same keys."""
    bindings = ["LoopConfig.steps=12", "LoopConfig.checkpoint_every=2", "LoopConfig.export=False"]
    clean, killed, _ = clean_then_killed_at_step_6("configs/experiments/ppo_tiny.gin",
                                                   tmp_path, bindings)
    timing = ("generation/seconds", "generation/tokens_per_s", "update_tokens_per_s")

    def untimed(out):
        return [{k: v for k, v in r.items() if k not in timing} for r in records(out)]

    assert untimed(killed) == untimed(clean)
    assert [r["iteration"] for r in records(clean)] == [0] * 4 + [1] * 4 + [2] * 4
    assert sorted(os.listdir(killed / "rollouts")) == ["iter_000001.p0.npz", "iter_000002.p0.npz"]
    # The critic trained: its values and loss moved, and the restored run saw the same ones.
    values = [r["ppo/values"] for r in records(clean)]
    assert len(set(values)) == len(values) and records(clean)[0]["critic/grad_norm"] > 0


@pytest.mark.parametrize("loss", ["d3po", "seppo"])
def test_diffusion_run_killed_resumes_exactly(loss, tmp_path):
    """A diffusion objective on the tiny DiT, killed after step 6's checkpoint: D3PO samples
    its trajectories from the restored policy with the same keys; SePPO restores its pool of
    policy snapshots and the reference drawn from it (a new draw every 2 steps)."""
    bindings = ["LoopConfig.steps=10", "LoopConfig.checkpoint_every=2",
                f"AlgoConfig.loss='{loss}'", "DiffusionConfig.reference_every=2"]
    clean, killed, interrupted_export = clean_then_killed_at_step_6(
        "configs/experiments/diffusion_tiny.gin", tmp_path, bindings)
    assert not interrupted_export
    assert records(killed) == records(clean)
    assert [r["step"] for r in records(clean)] == list(range(1, 11))
    assert len({r["loss"] for r in records(clean)}) > 5  # the run moved
    assert (killed / "export" / "params.npz").exists()

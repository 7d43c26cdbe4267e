"""A `prefopt train` process killed with SIGKILL and restarted gives the uninterrupted metrics."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6


def command(out_dir):
    return [sys.executable, "-m", "prefopt_jax.cli", "train", "configs/experiments/dpo_tiny.gin",
            f"--gin.LoopConfig.steps={STEPS}", f"--gin.LoopConfig.output_dir='{out_dir}'",
            "--gin.LoopConfig.checkpoint_every=2", "--gin.LoopConfig.export=False",
            "--gin.ModelSpec.overrides={'num_layers': 1}", "--gin.DataSpec.batch_size=4"]


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu"}


def test_sigkill_then_restart_equals_uninterrupted(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(command(clean), cwd=ROOT, env=env(), check=True, capture_output=True)
    proc = subprocess.Popen(command(killed), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill once the first checkpoint exists and a later step is logged (mid-run, maybe mid-save).
    deadline = time.time() + 240
    while time.time() < deadline:
        path = killed / "metrics.jsonl"
        if (killed / "checkpoints" / "2").exists() and path.exists() and \
                len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(command(killed), cwd=ROOT, env=env(), check=True, capture_output=True)
    assert records(killed) == records(clean)
    assert [r["step"] for r in records(clean)] == list(range(1, STEPS + 1))

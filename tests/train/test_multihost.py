"""Two `prefopt train` processes over gloo on 127.0.0.1 equal one process with the same batch.

Each process owns one CPU device and reads its own half of the examples; the one-process run
has two devices, so both runs use the same (2, 1, 1) mesh and global batch. Every step sees the
whole data set in the same order (no shuffle: host 0 holds the first half), so both runs
see identical global batches.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3


def command(out_dir, *extra):
    # SGD: Adam turns reduction-order noise in near-zero gradients into full-size updates.
    return [sys.executable, "-m", "prefopt_jax.cli", "train", "configs/experiments/dpo_tiny.gin",
            "configs/optim/sgd_linear.gin", "--gin.OptimConfig.learning_rate=0.5",
            "--gin.OptimConfig.warmup_steps=0",
            f"--gin.LoopConfig.steps={STEPS}", f"--gin.LoopConfig.output_dir='{out_dir}'",
            "--gin.LoopConfig.checkpoint_every=0", "--gin.LoopConfig.export=False",
            "--gin.LoopConfig.mesh_shape=(2, 1, 1)", "--gin.DataSpec.layout='padded'",
            "--gin.ModelSpec.overrides={'num_layers': 1}", "--gin.DataSpec.batch_size=8",
            "--gin.DataSpec.tiny_examples=8", "--gin.DataSpec.shuffle=False", *extra]


def env(devices):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_over_gloo_equal_one(tmp_path):
    port = free_port()
    procs = [subprocess.Popen(
        command(tmp_path / "two", f"--coordinator=127.0.0.1:{port}", "--num-processes=2",
                f"--process-id={i}", "--cpu-collectives=gloo"),
        cwd=ROOT, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)]
    one = subprocess.run(command(tmp_path / "one"), cwd=ROOT, env=env(2), capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stdout + one.stderr
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out.decode()[-4000:]
    two, single = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards/accuracy", "grad_norm", "tokens"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in single], rtol=1e-5,
                                   err_msg=key)
    assert two[-1]["loss"] < two[0]["loss"] - 1e-3  # the runs really trained

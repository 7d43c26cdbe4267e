"""Two `prefopt train` processes over gloo on 127.0.0.1 equal one process with the same batch.

Each process owns one CPU device and reads its own half of the examples; the one-process run
has two devices, so both runs use the same mesh and global batch. Every step sees the whole
data set in the same order (no shuffle: host 0 holds the first half), so both runs see
identical global batches. The main run shards the parameters over the two processes (fsdp), so
the Hugging Face export must gather them; the precomputed-reference runs are data parallel.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3


def command(out_dir, *extra, steps=STEPS, config="configs/experiments/dpo_tiny.gin"):
    # SGD: Adam turns reduction-order noise in near-zero gradients into full-size updates.
    return [sys.executable, "-m", "prefopt_jax.cli", "train", config,
            "configs/optim/sgd_linear.gin", "--gin.OptimConfig.learning_rate=0.5",
            "--gin.OptimConfig.warmup_steps=0",
            f"--gin.LoopConfig.steps={steps}", f"--gin.LoopConfig.output_dir='{out_dir}'",
            "--gin.LoopConfig.checkpoint_every=0", "--gin.LoopConfig.export=False",
            "--gin.LoopConfig.mesh_shape=(2, 1, 1)", "--gin.DataSpec.layout='padded'",
            "--gin.ModelSpec.overrides={'num_layers': 1}", "--gin.DataSpec.batch_size=8",
            "--gin.DataSpec.tiny_examples=8", "--gin.DataSpec.shuffle=False", *extra]


def env(devices):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                                       "--xla_backend_optimization_level=0 "
                                       "--xla_cpu_use_fusion_emitters=false",
            "JAX_PLATFORMS": "cpu"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(out_dir, *extra, steps=STEPS, **kw):
    """Both processes of a two-process run, started (not waited for)."""
    port = free_port()
    return [subprocess.Popen(
        command(out_dir, f"--coordinator=127.0.0.1:{port}", "--num-processes=2",
                f"--process-id={i}", "--cpu-collectives=gloo", *extra, steps=steps, **kw),
        cwd=ROOT, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)]


def wait_two(procs, timeout=600) -> list[str]:
    """Each process's output, once both succeeded."""
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out.decode()[-4000:]
        outs.append(out.decode())
    return outs


def run_one(out_dir, *extra, **kw) -> str:
    one = subprocess.run(command(out_dir, *extra, **kw), cwd=ROOT, env=env(2),
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stdout + one.stderr
    return one.stdout


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def progress_tokens(output: str) -> list[int]:
    """The cumulative token counts of the progress lines."""
    return [int(t) for t in re.findall(r"^step \d+/\d+ .* tokens (\d+) tok/s", output, re.M)]


def assert_same_metrics(two, single, first_accuracy=True):
    """Equal metrics. `first_accuracy=False` skips step 1's reward accuracy: there the policy is
    the reference, every implicit reward is 0 up to rounding and its sign is noise (a reference
    precomputed per host on half the rows rounds differently from one computed on all)."""
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards/accuracy", "grad_norm", "tokens"):
        skip = 0 if first_accuracy or key != "rewards/accuracy" else 1
        np.testing.assert_allclose([r[key] for r in two[skip:]], [r[key] for r in single[skip:]],
                                   rtol=1e-5, err_msg=key)


def test_two_processes_over_gloo_equal_one(tmp_path):
    """Metrics, global token counts and the gathered HF export of fsdp over two hosts."""
    from safetensors.numpy import load_file

    extra = ("--gin.LoopConfig.mesh_shape=(1, 2, 1)", "--gin.LoopConfig.export=True")
    procs = start_two(tmp_path / "two", *extra)
    one_out = run_one(tmp_path / "one", *extra)
    outs = wait_two(procs)
    two, single = records(tmp_path / "two"), records(tmp_path / "one")
    assert_same_metrics(two, single)
    assert two[-1]["loss"] < two[0]["loss"] - 1e-3  # the runs really trained
    # tok/s counts every host's tokens: process 0's progress equals the one-process run's.
    assert progress_tokens(outs[0]) == progress_tokens(one_out)
    assert progress_tokens(one_out) == list(np.cumsum([round(r["tokens"]) for r in single]))
    got, want = (load_file(str(tmp_path / d / "export" / "model.safetensors"))
                 for d in ("two", "one"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_online_grpo_over_two_processes_equals_one(tmp_path):
    """Each process samples and scores its own prompts (2 of the 4 per iteration) with keys of
    their draw numbers; the global update equals the one-process run's. One mini-batch per
    epoch, so both runs' steps see all 4 groups."""
    config = {"config": "configs/experiments/grpo_tiny.gin", "steps": 4}
    extra = ("--gin.RLConfig.minibatches=1", "--gin.RLConfig.epochs=2",
             "--gin.OptimConfig.learning_rate=0.05")
    procs = start_two(tmp_path / "two", *extra, **config)
    run_one(tmp_path / "one", *extra, **config)
    wait_two(procs)
    two, single = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["iteration"] for r in two] == [0, 0, 1, 1]
    for key in ("reward/mean", "completion/length_mean", "loss", "grad_norm", "kl", "tokens"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in single], rtol=1e-4,
                                   atol=1e-6, err_msg=key)
    assert two[1]["kl"] > 0  # the policy moved within the iteration
    assert sorted(os.listdir(tmp_path / "two" / "rollouts")) == [
        f"iter_{t:06d}.p{p}.npz" for t in (0, 1) for p in (0, 1)]


def test_precomputed_reference_over_two_processes(tmp_path):
    """One cache file, written by process 0 alone, equals one process and is reused."""
    cache = tmp_path / "cache"

    def precomputed(cache_dir):
        return ("--gin.ReferenceConfig.kind='precomputed'",
                f"--gin.ReferenceConfig.cache_dir='{cache_dir}'")

    procs = start_two(tmp_path / "two", *precomputed(cache))
    run_one(tmp_path / "one", *precomputed(tmp_path / "cache_one"))
    first = wait_two(procs)
    assert_same_metrics(records(tmp_path / "two"), records(tmp_path / "one"), first_accuracy=False)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz"), files  # one key, no temporary files
    path = str(cache / files[0])
    for out in first:
        assert f"cache miss {path}" in out
    assert f"wrote {path}" in first[0] and "wrote" not in first[1]
    stat = os.stat(path)
    second = wait_two(start_two(tmp_path / "again", *precomputed(cache)))
    for out in second:
        assert f"cache hit {path}" in out and "cache miss" not in out and "wrote" not in out
    assert os.listdir(cache) == files and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    np.testing.assert_array_equal([r["loss"] for r in records(tmp_path / "again")],
                                  [r["loss"] for r in records(tmp_path / "two")])


def test_sigterm_to_one_host_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaching only process 1: both checkpoint one step and exit (no one hangs)."""
    out = tmp_path / "two"
    procs = start_two(out, steps=10_000)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and
                                           len(metrics.read_text().splitlines()) >= 2):
        assert all(p.poll() is None for p in procs), "a process ended before the signal"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    try:
        outs = wait_two(procs, timeout=120)
    finally:
        for p in procs:
            p.kill()
    saved = [re.findall(r"SIGTERM: checkpointed step (\d+)", o) for o in outs]
    assert saved[0] and saved[0] == saved[1], outs
    step = int(saved[0][0])
    assert step < 10_000 and os.listdir(out / "checkpoints") == [str(step)]
    assert records(out)[-1]["step"] == step

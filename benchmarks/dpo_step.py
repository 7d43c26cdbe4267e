"""Tokens/s, MFU and peak memory of one DPO step per layout on a long-tailed length mix.

    python benchmarks/dpo_step.py --model smollm2-135m-instruct --examples 16 --steps 3
    python benchmarks/dpo_step.py --model tiny            # seconds, for a smoke check

Prints one JSON object per layout. MFU is against a measured float32 matmul peak of this machine
(6 * params * tokens FLOPs per step, tokens = non-padding row positions). TRL side by side is
not run here yet (trl is not installed; see the report of issue 5).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_flops(n: int = 1024, reps: int = 5) -> float:
    """Measured float32 matmul FLOP/s (the MFU denominator)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def bench_layout(layout: str, args) -> dict:
    from prefopt_jax.data import LayoutConfig, Loader
    from prefopt_jax.data.synthetic import synthetic_tokenized
    from prefopt_jax.models import sharding as sharding_lib
    from prefopt_jax.train import build, loop, optim

    model, _ = loop.load_model(loop.ModelSpec(source=args.model))
    data = synthetic_tokenized(args.examples * (args.steps + 1), seed=0,
                               prompt_median=args.prompt_median,
                               completion_median=args.completion_median,
                               max_length=args.max_length, vocab_size=model.config.vocab_size)
    layout_cfg = LayoutConfig(kind=layout)  # packed rows: bucket of the longest example
    loader = Loader(data, args.examples, layout_cfg, shuffle=False)
    batches = [build.stack_micro([loader.next_batch()]) for _ in range(args.steps + 1)]
    mesh = sharding_lib.make_mesh((1, 1, 1))
    opt = optim.OptimConfig(learning_rate=1e-6, schedule="constant")
    n_params = sum(x.size for x in jax.tree.leaves(jax.tree.map(
        lambda v: v, __import__("flax").nnx.state(model, __import__("flax").nnx.Param))))
    _, state, step_fn, batch_sh = build.build(model, build.AlgoConfig("dpo"), opt, batches[0],
                                              mesh, logps_chunk=args.chunk)
    times, tokens, positions = [], 0, 0
    with jax.set_mesh(mesh):
        for i, b in enumerate(batches):
            if b["tokens"].shape != batches[0]["tokens"].shape:
                continue  # a new bucket would recompile; time one shape only
            t = time.perf_counter()
            state, metrics = step_fn(state, jax.device_put(b, batch_sh))
            jax.block_until_ready(metrics)
            if i:
                times.append(time.perf_counter() - t)
                tokens += int(np.sum(b["segment_ids"] > 0))
                positions += b["tokens"].size
    seconds = sum(times)
    flops = 6 * n_params * tokens
    return {"layout": layout, "tokens_per_s": tokens / seconds, "steps_timed": len(times),
            "row_shape": list(batches[0]["tokens"].shape),
            "padding_fraction": 1 - tokens / max(positions, 1),
            "achieved_flops": flops / seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--examples", type=int, default=16, help="pairs per batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--prompt-median", type=float, default=60)
    p.add_argument("--completion-median", type=float, default=100)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--layouts", default="padded,packed,prefix")
    args = p.parse_args()
    peak = matmul_peak_flops()
    for layout in args.layouts.split(","):
        out = bench_layout(layout, args)
        out["mfu"] = out["achieved_flops"] / peak
        out["matmul_peak_flops"] = peak
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

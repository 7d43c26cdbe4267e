"""Forward and gradient time of `attend`, one block against causal query blocks.

    python benchmarks/attention.py                 # SmolLM2's heads, rows of 128 to 512
    python benchmarks/attention.py --rows 5 --length 512 --blocks 32,64,128

Packed rows of several segments (40 to 200 tokens each), SmolLM2-135M's heads (9 query, 3 kv,
64 wide), float32 or `--dtype bfloat16`. Prints one JSON object per (length, block): the best
of `--trials` runs of the jitted forward and of the jitted gradient (which includes its
forward), and the largest difference from the one-block result.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from forward import best_time  # benchmarks/forward.py, beside this script
from prefopt_jax.models.transformer import attend, attention_block, attention_mask


def best_ms(fn, *args, trials: int) -> float:
    """Best of `trials` runs after a compiling one, in milliseconds."""
    jax.block_until_ready(fn(*args))
    return best_time(fn, *args, steps=trials) * 1e3


def packed_inputs(rows: int, length: int, heads: int, kv_heads: int, width: int, seed: int = 0,
                  dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        at, s = 0, 1
        while at < length - 20:
            n = int(rng.integers(40, 200))
            seg[r, at:at + n], at, s = s, at + n, s + 1
    seg = jnp.asarray(seg)
    mask = attention_mask(seg, jnp.zeros_like(seg), seg, jnp.zeros_like(seg), 0)
    q, k, v = (jnp.asarray(rng.normal(size=(rows, length, n, width)), dtype)
               for n in (heads, kv_heads, kv_heads))
    return q, k, v, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=0, help="rows (0: 4096 positions / length)")
    p.add_argument("--length", default="128,256,512")
    p.add_argument("--blocks", default="none,64", help="query blocks; none = one block")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args()
    for length in (int(x) for x in args.length.split(",")):
        rows = args.rows or max(1, 4096 // length)
        q, k, v, mask = packed_inputs(rows, length, 9, 3, 64, dtype=jnp.dtype(args.dtype))
        base = None
        for name in args.blocks.split(","):
            block = None if name == "none" else int(name)
            fwd = jax.jit(lambda q, k, v, m, b=block: attend(q, k, v, m, b))
            grad = jax.jit(jax.grad(lambda q, k, v, m, b=block: jnp.sum(jnp.sin(
                attend(q, k, v, m, b))), argnums=(0, 1, 2)))
            out = fwd(q, k, v, mask)
            base = out if base is None else base
            print(json.dumps({"dtype": args.dtype, "rows": rows, "length": length, "block": block,
                              "default_block": attention_block(length),
                              "forward_ms": best_ms(fwd, q, k, v, mask, trials=args.trials),
                              "grad_ms": best_ms(grad, q, k, v, mask, trials=args.trials),
                              "max_diff": float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                                                - base.astype(jnp.float32))))}),
                  flush=True)


if __name__ == "__main__":
    main()

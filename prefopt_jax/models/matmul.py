"""2-D matmuls with float32 accumulation for low-precision operands, forward and backward.

Shape letters: `n` rows (flattened batch and positions), `i` input width, `o` output width.

For float32 operands `matmul` is the plain product. For bfloat16 (or float16) operands it
multiplies in that dtype and accumulates in float32 (`preferred_element_type`), then rounds the
result to the output dtype, which is what a GPU or TPU matmul unit does and, on CPUs with bf16
dot instructions (AVX512-BF16), runs about twice as fast as float32 under XLA:CPU; a dot whose
output is bf16 is instead widened to float32 operands and runs no faster.

Its gradient keeps that form. JAX's own transpose of a `preferred_element_type` dot multiplies
the float32 cotangent with the bf16 operand, which XLA widens to float32; here the cotangent is
rounded to the operand dtype first and both gradient products are bf16 dots with float32
accumulation, as in PyTorch's autocast. XLA:CPU runs a bf16 dot fast only when the left operand
is contracted over its last dim in row-major order, and the weight gradient `x.T @ dy`
contracts `x` over its rows, so on CPU `x` (or `dy`) is transposed into row-major memory first
(`_row_major_transpose`); that copy costs far less than the float32 fallback it avoids
(benchmarks/README.md). With a mesh of more than one device the copy is skipped: flattening a
sharded dim would make the partitioner gather it, and the dot is then merely slower.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _dot_f32(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)


def _single_device() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def _row_major_transpose(x_ab: jax.Array) -> jax.Array:
    """`x.T` materialised row-major on CPU, so the dot it feeds sees a plain left operand.

    A bare transpose is folded into the dot's dimension numbers (and the barrier alone is
    dropped), which sends a bf16 dot to XLA:CPU's widening fallback; the flat reshape behind
    a barrier forces the row-major copy. Elsewhere the transpose is left to the compiler.
    """
    a, b = x_ab.shape
    if jax.default_backend() != "cpu" or not _single_device():
        return x_ab.T
    return lax.optimization_barrier(x_ab.T.reshape(a * b)).reshape(b, a)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_matmul(x_ni: jax.Array, w: jax.Array, w_transposed: bool, out_dtype):
    return _dot_f32(x_ni, w, 1, 1 if w_transposed else 0).astype(out_dtype)


def _low_precision_fwd(x_ni, w, w_transposed, out_dtype):
    return _low_precision_matmul(x_ni, w, w_transposed, out_dtype), (x_ni, w)


def _low_precision_bwd(w_transposed, out_dtype, residuals, dy_no):
    x_ni, w = residuals
    dy_no = dy_no.astype(x_ni.dtype)
    if w_transposed:  # w is [o, i]: y = x @ w.T
        dx_ni = _dot_f32(dy_no, w, 1, 0)
        dw = _dot_f32(_row_major_transpose(dy_no), x_ni, 1, 0)
    else:  # w is [i, o]
        dx_ni = _dot_f32(dy_no, w, 1, 1)
        dw = _dot_f32(_row_major_transpose(x_ni), dy_no, 1, 0)
    return dx_ni.astype(x_ni.dtype), dw.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_fwd, _low_precision_bwd)


def matmul(x_ni: jax.Array, w: jax.Array, w_transposed: bool = False,
           out_dtype=None) -> jax.Array:
    """`x @ w` (`x @ w.T` with `w_transposed`) for 2-D operands of one dtype.

    bf16/f16 operands accumulate in float32 and round to `out_dtype` (default: their dtype;
    float32 keeps the accumulator, e.g. for logits), in the forward and the backward pass.
    Other dtypes take the plain product, cast to `out_dtype` when given.
    """
    if x_ni.ndim != 2 or w.ndim != 2:
        raise ValueError(f"matmul takes 2-D operands, got {x_ni.shape} and {w.shape}")
    out_dtype = jnp.dtype(out_dtype or x_ni.dtype)
    if x_ni.dtype == w.dtype and x_ni.dtype in LOW_PRECISION:
        return _low_precision_matmul(x_ni, w, w_transposed, out_dtype)
    y = x_ni @ (w.T if w_transposed else w)
    return y.astype(out_dtype)

"""models.matmul: bf16 products accumulate in float32, forward and backward, on the fast path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax.models.matmul import matmul

BF16 = jnp.bfloat16


def operands(n=48, i=40, o=24, transposed=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, i)).astype(np.float32)
    w = rng.normal(size=(o, i) if transposed else (i, o)).astype(np.float32)
    dy = rng.normal(size=(n, o)).astype(np.float32)
    return x, w, dy


def bf16_exact(a):
    """float32 copy of `a` rounded to bf16 (so products of these are exact in float32)."""
    return np.asarray(jnp.asarray(a, BF16).astype(jnp.float32))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_low_precision_matmul_and_gradients_match_float32_accumulation(transposed, out_dtype):
    x, w, dy = (bf16_exact(a) for a in operands(transposed=transposed))
    w_io = w.T if transposed else w
    y, vjp = jax.vjp(lambda x, w: matmul(x, w, transposed, out_dtype),
                     jnp.asarray(x, BF16), jnp.asarray(w, BF16))
    assert y.dtype == (jnp.float32 if out_dtype else BF16)
    dx, dw = vjp(jnp.asarray(dy, y.dtype))
    assert dx.dtype == BF16 and dw.dtype == BF16
    # float64 references of the exact products, rounded once: what float32 accumulation gives
    # to within float32 rounding, and a bf16 accumulator would miss by far more.
    dy_used = bf16_exact(dy)  # the cotangent is rounded to the operand dtype first
    refs = {"y": x.astype(np.float64) @ w_io, "dx": dy_used.astype(np.float64) @ w_io.T,
            "dw": x.T.astype(np.float64) @ dy_used}
    refs["dw"] = refs["dw"].T if transposed else refs["dw"]
    got = {"y": y, "dx": dx, "dw": dw}
    for name, ref in refs.items():
        rounded = np.asarray(jnp.asarray(ref, got[name].dtype).astype(jnp.float32))
        err = np.abs(np.asarray(got[name], np.float32) - rounded)
        # one rounding step of the output dtype at most (the float32 sum may sit on a tie)
        ulp = np.abs(rounded) * (2.0 ** -7 if got[name].dtype == BF16 else 2.0 ** -20) + 1e-6
        assert np.all(err <= ulp), (name, float(err.max()))


def test_float32_matmul_is_the_plain_product():
    x, w, dy = operands(transposed=True)
    y, vjp = jax.vjp(lambda x, w: matmul(x, w, True), x, w)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    dx, dw = vjp(dy)
    np.testing.assert_allclose(dx, dy @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dy.T @ x, rtol=1e-5, atol=1e-5)


def test_rejects_operands_that_are_not_2d():
    with pytest.raises(ValueError, match=r"2-D operands.*\(2, 3, 4\)"):
        matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))


def dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """Element types of both operands of every dot in an optimised HLO module."""
    types = {}
    for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo):
        types[m.group(1)] = m.group(2)
    for m in re.finditer(r"\(%([\w.\-]+): (\w+)\[", hlo):  # computation parameters
        types[m.group(1)] = m.group(2)
    return [(types.get(a), types.get(b))
            for a, b in re.findall(r"= \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 dot fast path")
@pytest.mark.parametrize("transposed", [False, True])
def test_every_dot_of_the_gradient_multiplies_bf16_operands(transposed):
    """Forward, input-gradient and weight-gradient dots all take bf16 operands after XLA's
    passes: JAX's own transpose (float32 cotangent) or a transposed left operand makes XLA:CPU
    widen them to float32, which runs at half the speed."""
    x, w, dy = operands(n=256, i=128, o=192, transposed=transposed)

    def fwd_bwd(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: matmul(x, w, transposed), x, w)
        return y, vjp(dy)

    args = [jnp.asarray(a, BF16) for a in (x, w, dy)]
    hlo = jax.jit(fwd_bwd).lower(*args).compile().as_text()
    dots = dot_operand_types(hlo)
    assert len(dots) == 3, dots
    assert all(t == ("bf16", "bf16") for t in dots), dots

    def plain(x, w, dy):  # the widening form this module replaces: must be seen as such
        f = lambda x, w: jnp.dot(x, w.T if transposed else w,
                                 preferred_element_type=jnp.float32).astype(BF16)
        y, vjp = jax.vjp(f, x, w)
        return y, vjp(dy)

    plain_dots = dot_operand_types(jax.jit(plain).lower(*args).compile().as_text())
    assert len(plain_dots) == 3 and any(t != ("bf16", "bf16") for t in plain_dots), plain_dots

"""Reward aggregation (ensembles, PAR) by hand, against numpy, and with finite bf16 gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax.rewards import aggregate


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_ensembles_hand():
    r = jnp.asarray([[1, 2], [3, 0], [2, 4]], jnp.float32)
    np.testing.assert_allclose(aggregate.ensemble_mean(r), [2, 2])
    np.testing.assert_allclose(aggregate.wco(r), [1, 0])
    # population variances (2/3, 8/3)
    np.testing.assert_allclose(aggregate.uwo(r), [2 - 1 / 3, 2 - 4 / 3], rtol=1e-6)
    np.testing.assert_allclose(aggregate.uwo(r, lam=0.1), [2 - 0.2 / 3, 2 - 0.8 / 3], rtol=1e-6)
    np.testing.assert_allclose(aggregate.aggregate("wco", r), [1, 0])
    with pytest.raises(ValueError, match="unknown ensemble aggregation 'min'"):
        aggregate.aggregate("min", r)


def test_par_hand():
    # s(1) + s(0) + s(-1) = 1.5
    got = aggregate.par(jnp.asarray([1.0]), jnp.asarray([[0.0, 1.0, 2.0]]))
    np.testing.assert_allclose(got, [0.5], rtol=1e-6)


@pytest.mark.parametrize("lam", [0.5, 0.1])
def test_against_numpy(lam):
    rng = np.random.default_rng(3)
    r_en, r_n, ref_nm = rng.normal(size=(5, 7)), rng.normal(size=7), rng.normal(size=(7, 10))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(aggregate.ensemble_mean(f32(r_en)), r_en.mean(0), rtol=1e-5)
    np.testing.assert_allclose(aggregate.wco(f32(r_en)), r_en.min(0), rtol=1e-6)
    want = r_en.mean(0) - lam * ((r_en - r_en.mean(0)) ** 2).mean(0)
    np.testing.assert_allclose(aggregate.uwo(f32(r_en), lam=lam), want, rtol=1e-5, atol=1e-6)
    want = np.array([np.mean(sig(2.0 * (r_n[n] - ref_nm[n]))) for n in range(7)])
    np.testing.assert_allclose(aggregate.par(f32(r_n), f32(ref_nm), k=2.0), want, rtol=1e-5)


@pytest.mark.parametrize("name", ["mean", "wco", "uwo", "par"])
def test_bf16_grads_finite(name):
    r = jnp.asarray([[1e3, -1e3], [-1e3, 1e3], [5.0, -5.0]], jnp.bfloat16)
    if name == "par":
        g = jax.grad(lambda x: jnp.sum(aggregate.par(x[0], x[1:].T)))(r)
    else:
        g = jax.grad(lambda x: jnp.sum(aggregate.AGGREGATIONS[name](x)))(r)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))

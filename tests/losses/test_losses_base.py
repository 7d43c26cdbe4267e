"""The one reduction helper and the batch-layout adapters."""

import jax.numpy as jnp
import numpy as np
import pytest

import prefopt_jax.losses as losses
from prefopt_jax.losses import base


def test_seq_reduce_sum_mean_and_reference_free():
    logps = jnp.asarray([[-1.0, -2.0, jnp.nan], [-4.0, 0.0, 0.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # nan under the mask and an empty (filler) row must both stay finite.
    np.testing.assert_allclose(losses.seq_reduce(logps, mask), [-3.0, 0.0])
    np.testing.assert_allclose(losses.seq_reduce(logps, mask, reduction="mean"), [-1.5, 0.0])
    np.testing.assert_allclose(losses.seq_reduce(None, mask), [0.0, 0.0])
    with pytest.raises(ValueError, match="unknown reduction"):
        losses.seq_reduce(logps, mask, reduction="median")


def test_ld_token_weights():
    mask_w = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
    mask_l = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])
    tw_w, tw_l = base.ld_token_weights(mask_w, mask_l, 0.3)
    np.testing.assert_allclose(tw_w, [[1.0, 0.3, 0.3, 0.3]])
    np.testing.assert_allclose(tw_l * mask_l, mask_l)  # the shorter side is all weight 1
    logps = jnp.asarray([[-1.0, -2.0, -3.0, -9.0]])
    np.testing.assert_allclose(losses.seq_reduce(logps, mask_w, tw_w), [-1.0 - 0.3 * 5.0],
                               rtol=1e-6)


def test_log1mexp_stable():
    x = jnp.asarray([-1e-8, -1e-3, -0.5, -1.0, -30.0])
    got = np.asarray(base.log1mexp(x))
    want = np.log(-np.expm1(np.minimum(np.asarray(x, np.float64), -1e-6)))  # clamped below 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_pairwise_from_interleaved():
    logps_qc = jnp.arange(12.0).reshape(6, 2)
    inputs = losses.pairwise_from_interleaved(logps_qc, jnp.ones((6, 2)), -logps_qc,
                                              valid_p=jnp.ones(3))
    np.testing.assert_allclose(inputs.logps_w_pc, logps_qc[0::2])
    np.testing.assert_allclose(inputs.logps_l_pc, logps_qc[1::2])
    np.testing.assert_allclose(inputs.ref_logps_l_pc, -logps_qc[1::2])
    assert losses.pairwise_from_interleaved(logps_qc, jnp.ones((6, 2))).ref_logps_w_pc is None


def test_listwise_from_flat():
    logps_qc = jnp.arange(12.0).reshape(6, 2)
    inputs = losses.listwise_from_flat(logps_qc, jnp.ones((6, 2)), jnp.zeros((2, 3)))
    np.testing.assert_allclose(inputs.logps_pkc[1, 0], logps_qc[3])

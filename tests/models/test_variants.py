"""scan_layers, remat policies and bfloat16 give the plain model's results."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import ModelConfig
from prefopt_jax.models.hf import model_from_params
from prefopt_jax.models.transformer import REMAT_POLICIES

TOKENS_BT = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
POSITIONS_BT = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1))


@nnx.jit
def loss_logits_grads(model):
    """A scalar of all logits, the logits, and d scalar / d params."""
    weights_btv = jax.random.normal(jax.random.key(0), (2, 16, 128))

    def loss_fn(model):
        logits_btv = model(TOKENS_BT, POSITIONS_BT).astype(jnp.float32)
        return jnp.sum(jax.nn.log_softmax(logits_btv) * weights_btv), logits_btv

    (loss, logits_btv), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, logits_btv, nnx.to_pure_dict(grads)


def unstacked(grads, config):
    """Scanned-layout gradients -> per-layer layout, to compare with the plain model."""
    if not config.scan_layers:
        return grads
    layers = {i: jax.tree.map(lambda x: x[i], grads["layers"]) for i in range(config.num_layers)}
    return {**grads, "layers": layers}


@pytest.mark.filterwarnings("ignore:remat_policy=:UserWarning")  # numerics of unrolled remat
def test_scan_and_remat_match_plain(tiny_model, tiny_params, forward):
    """Scanned + rematerialised (dots_saveable): same loss, logits and gradients as plain.

    The unscanned remat path ("full") is checked on logits only, to spare a third gradient
    compile; both paths wrap the same layer function with nnx.remat.
    """
    base = tiny_model(seed=5).config
    params = tiny_params(base, seed=5)
    ref_loss, ref_logits, ref_grads = loss_logits_grads(model_from_params(base, params))
    config = dataclasses.replace(base, scan_layers=True, remat_policy="dots_saveable")
    loss, logits, grads = loss_logits_grads(model_from_params(config, params))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 unstacked(grads, config), ref_grads)
    full = model_from_params(dataclasses.replace(base, remat_policy="full"), params)
    np.testing.assert_allclose(forward(full, TOKENS_BT, POSITIONS_BT), ref_logits, atol=1e-5)


def test_scanned_params_carry_layers_axis(tiny_model):
    model = tiny_model(scan_layers=True)
    w_q = model.layers.attn.w_q
    assert w_q.shape == (2, 64, 4, 16)
    assert w_q.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")


def test_bfloat16_params_run_and_are_close(tiny_model, tiny_params, forward):
    base = tiny_model(seed=6).config
    params = tiny_params(base, seed=6)
    ref = np.asarray(forward(model_from_params(base, params), TOKENS_BT, POSITIONS_BT))
    bf16 = dataclasses.replace(base, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    model = model_from_params(bf16, params)
    assert model.layers[0].mlp.w_up[...].dtype == jnp.bfloat16
    logits = forward(model, TOKENS_BT, POSITIONS_BT)
    assert logits.dtype == jnp.bfloat16
    err = np.abs(np.asarray(logits, np.float32) - ref)
    assert err.max() < 0.05 * np.abs(ref).max() + 0.02, err.max()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    assert set(REMAT_POLICIES) >= {"none", "full", "dots_saveable"}
    assert hash(ModelConfig(rope_scaling={"type": "linear", "factor": 2.0}))

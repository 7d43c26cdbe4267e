"""The DiT denoiser: shapes, adaLN-Zero init, logical axes, patches, guidance, label dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.diffusion import model as dit
from prefopt_jax.diffusion.model import TINY, DiT, DiTConfig
from prefopt_jax.models import sharding

RULE_NAMES = {name for name, _ in sharding.LOGICAL_AXIS_RULES}


def _inputs(batch=4, seed=0, config=TINY):
    x_bhwc = jax.random.normal(jax.random.key(seed), (batch, *config.image_shape))
    t_b = jnp.arange(batch) * 300 + 7
    labels_b = jnp.arange(batch) % (config.num_classes + 1)
    return x_bhwc, t_b, labels_b


def test_forward_shape_and_zero_output_at_init(forward):
    """adaLN-Zero: the output layer starts at zero, so the prediction is exactly 0."""
    model = jax.jit(lambda: DiT(TINY, rngs=nnx.Rngs(0)))()
    out = forward(model, *_inputs())
    assert out.shape == (4, 8, 8, 1) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0)
    for block in model.blocks:  # so every block starts as the identity (next test)
        assert all(np.all(np.asarray(v) == 0)
                   for v in jax.tree.leaves(nnx.state(block.modulation)))


def test_blocks_are_the_identity_with_zero_modulation(random_dit):
    """Zero modulation gates every residual branch, even with random attention and MLP weights."""
    block = random_dit().blocks[0]
    run = jax.jit(lambda state, x, c: nnx.merge(graphdef, state)(x, c))
    graphdef, state = nnx.split(block)
    x_btd = jax.random.normal(jax.random.key(1), (2, 16, 32))
    cond_bd = jax.random.normal(jax.random.key(2), (2, 32))
    assert not np.allclose(run(state, x_btd, cond_bd), x_btd, atol=1e-3)
    zero = jax.tree.map(jnp.zeros_like, nnx.state(block.modulation))
    nnx.update(block.modulation, zero)
    np.testing.assert_array_equal(run(nnx.state(block), x_btd, cond_bd), x_btd)


def test_every_parameter_has_logical_names():
    model = nnx.eval_shape(lambda: DiT(dataclasses.replace(TINY, depth=1), rngs=nnx.Rngs(0)))
    names = {"/".join(map(str, path)): var.get_metadata().get("out_sharding")
             for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    shapes = {"/".join(map(str, path)): var.get_value().shape
              for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert len(names) == 25
    for path, axes in names.items():
        assert axes is not None and len(axes) == len(shapes[path]), path
        assert set(axes) - {None} <= RULE_NAMES, path
        assert any(axis is not None for axis in axes) or path == "b_out", path
    assert names["blocks/0/attn/w_q"] == ("embed", "heads", "head_dim")
    assert names["blocks/0/attn/w_o"] == ("heads", "head_dim", "embed")
    assert names["blocks/0/mlp/w_in"] == ("embed", "mlp")
    assert names["class_embed"] == (None, "embed")
    assert shapes["class_embed"] == (11, 32)  # ten classes and the null class


def test_logical_names_resolve_on_a_mesh():
    """On a (2, 2, 2) mesh every name has a rule, and width-carrying parameters are split."""
    model = nnx.eval_shape(lambda: DiT(TINY, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh((2, 2, 2))
    specs = {"/".join(map(str, path)): var.get_value().spec for path, var in
             nnx.to_flat_state(sharding.state_shardings(nnx.state(model, nnx.Param), mesh))}
    P = jax.sharding.PartitionSpec
    assert specs["blocks/0/attn/w_q"] == P("fsdp", "tensor", None)
    assert specs["blocks/1/mlp/w_out"] == P("tensor", "fsdp")
    assert specs["class_embed"] == P(None, "fsdp")


def test_patchify_layout_and_round_trip():
    # numpy in, numpy out: the reshapes are the same methods, and nothing compiles.
    x_bhwc = np.arange(16.0).reshape(1, 4, 4, 1)
    patches_btp = dit.patchify(x_bhwc, 2)
    np.testing.assert_array_equal(patches_btp[0], [[0, 1, 4, 5], [2, 3, 6, 7],
                                                   [8, 9, 12, 13], [10, 11, 14, 15]])
    y_bhwc = np.random.default_rng(0).standard_normal((2, 6, 6, 3))
    np.testing.assert_array_equal(dit.unpatchify(dit.patchify(y_bhwc, 3), 3, (6, 6, 3)), y_bhwc)


def test_embeddings_by_hand():
    pos_td = dit.position_embedding(2, 8)
    # Patch 0 sits at row 0, column 0: sines 0, cosines 1; patch 1 at column 1.
    np.testing.assert_allclose(pos_td[0], [0, 0, 1, 1, 0, 0, 1, 1])
    np.testing.assert_allclose(pos_td[1, 4:], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)],
                               rtol=1e-6)
    features_bk = dit.timestep_features(jnp.array([0.0, 2.0]), dim=4, max_period=100.0)
    np.testing.assert_allclose(features_bk, [[1, 1, 0, 0],
                                             [np.cos(2), np.cos(0.2), np.sin(2), np.sin(0.2)]],
                               rtol=1e-6)


def test_time_and_class_condition_the_output(random_dit, forward):
    model = random_dit()
    x_bhwc, t_b, labels_b = _inputs()
    out = forward(model, x_bhwc, t_b, labels_b)
    assert not np.allclose(forward(model, x_bhwc, t_b + 100, labels_b), out, atol=1e-3)
    assert not np.allclose(forward(model, x_bhwc, t_b, (labels_b + 1) % 11), out, atol=1e-3)
    # Rows are independent: a batch in another order gives the same rows.
    np.testing.assert_allclose(forward(model, x_bhwc[::-1], t_b[::-1], labels_b[::-1]),
                               out[::-1], atol=1e-5)


def test_classifier_free_guidance_formula(random_dit, forward):
    model = random_dit()
    x_bhwc, t_b, labels_b = _inputs()
    cond = np.asarray(forward(model, x_bhwc, t_b, labels_b))
    uncond = np.asarray(forward(model, x_bhwc, t_b, jnp.full_like(labels_b, model.null_label)))
    assert not np.allclose(cond, uncond, atol=1e-3)
    graphdef, state = nnx.split(model)
    # A traced scale always takes the doubled-batch path; a Python 1 skips the null rows.
    traced = jax.jit(lambda s, scale: dit.guided(nnx.merge(graphdef, s), x_bhwc, t_b, labels_b,
                                                 scale))
    np.testing.assert_allclose(traced(state, 0.0), uncond, atol=1e-5)
    np.testing.assert_allclose(traced(state, 1.0), cond, atol=1e-5)
    np.testing.assert_allclose(traced(state, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-4)
    calls = []
    counted = lambda *args: calls.append(args[0].shape) or forward(model, *args)  # noqa: E731
    counted.null_label = model.null_label
    np.testing.assert_allclose(dit.guided(counted, x_bhwc, t_b, labels_b, 1), cond, atol=1e-5)
    assert calls == [(4, 8, 8, 1)]


def test_drop_labels():
    labels_b = jnp.arange(4000) % 10
    key = jax.random.key(0)
    np.testing.assert_array_equal(dit.drop_labels(labels_b, 0.0, key, null_label=10), labels_b)
    np.testing.assert_array_equal(dit.drop_labels(labels_b, 1.0, key, null_label=10), 10)
    dropped = dit.drop_labels(labels_b, 0.25, key, null_label=10)
    assert dropped.dtype == jnp.int32
    is_null = np.asarray(dropped) == 10
    assert 0.22 < is_null.mean() < 0.28
    np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels_b)[~is_null])


def test_config_checks_and_presets(random_dit, forward):
    with pytest.raises(ValueError, match="patch=3 does not divide image_size=8"):
        DiTConfig(patch=3)
    with pytest.raises(ValueError, match="prediction='x0'"):
        DiTConfig(prediction="x0")
    with pytest.raises(ValueError, match="width=34"):
        DiTConfig(width=34, heads=2)
    with pytest.raises(ValueError, match="expects images of shape"):
        forward(random_dit(), jnp.zeros((1, 16, 16, 1)), jnp.zeros(1), jnp.zeros(1))
    assert dit.PRESETS["digits"].image_shape == (16, 16, 1)
    assert dit.PRESETS["tiny"].null_label == 10

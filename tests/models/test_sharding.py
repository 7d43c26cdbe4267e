"""Sharded placement: a 2x2x2 (data, fsdp, tensor) mesh of 8 fake CPU devices == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from prefopt_jax.models import ModelConfig, Transformer
from prefopt_jax.models import sharding

TOKENS_BT = jnp.asarray(np.random.default_rng(0).integers(0, 128, (4, 16)), jnp.int32)
POSITIONS_BT = jnp.tile(jnp.arange(16, dtype=jnp.int32), (4, 1))

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices")


def test_logical_to_spec_rules():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh_shape) == P("fsdp", "tensor")
    # An activation: batch takes data and fsdp, so embed (fsdp) must stay replicated.
    assert sharding.logical_to_spec(("batch", "length", "embed"), (4, 16, 64), mesh_shape) == \
        P(("data", "fsdp"), None, None)
    # 9 heads do not divide over tensor=2: replicated rather than failing.
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (576, 9, 64), mesh_shape) == \
        P("fsdp", None, None)
    assert sharding.logical_to_spec(("layers", "vocab", None), (2, 128, 3), mesh_shape) == \
        P(None, "tensor", None)
    with pytest.raises(KeyError, match="nonsense"):
        sharding.logical_to_spec(("nonsense",), (4,), mesh_shape)


@needs_8
def test_mesh_axes_are_auto():
    mesh = sharding.make_mesh((2, 2, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@needs_8
def test_sharded_forward_equals_single_device(tiny_model):
    model = tiny_model(seed=7)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens, positions:
                      nnx.merge(graphdef, state)(tokens, positions))
    single = np.asarray(forward(state, TOKENS_BT, POSITIONS_BT))

    mesh = sharding.make_mesh((2, 2, 2))
    sharded_state = jax.device_put(state, sharding.state_shardings(state, mesh))
    w_gate = sharded_state["layers"][0]["mlp"]["w_gate"].get_value()
    assert w_gate.sharding.spec == P("fsdp", "tensor")
    assert len({shard.device for shard in w_gate.addressable_shards}) == 8
    batch = jax.device_put((TOKENS_BT, POSITIONS_BT),
                           jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)))
    with jax.set_mesh(mesh):
        logits = forward(sharded_state, *batch)
    assert logits.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(logits), single, atol=1e-5)


@needs_8
def test_scanned_state_shardings_have_a_replicated_layers_axis():
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, scan_layers=True)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    shardings = sharding.state_shardings(nnx.state(abstract), sharding.make_mesh((2, 2, 2)))
    layers = shardings["layers"]
    assert layers["mlp"]["w_gate"].get_value().spec == P(None, "fsdp", "tensor")
    assert layers["attn"]["w_o"].get_value().spec == P(None, "tensor", None, "fsdp")
    assert shardings["lm_head"].get_value().spec == P("fsdp", "tensor")


@needs_8
def test_init_under_jit_with_out_shardings():
    """Invariant 1: params are created already sharded from eval_shape + the rules."""
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                         num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    mesh = sharding.make_mesh((2, 2, 2))
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = sharding.state_shardings(abstract_state, mesh)
    init = jax.jit(lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0)))[1],
                   out_shardings=shardings)
    state = init()
    assert state["embed"].get_value().sharding.spec == P("tensor", "fsdp")
    assert state["layers"][0]["attn"]["w_k"].get_value().sharding.spec == P("fsdp", "tensor", None)


@needs_8
def test_constrain_is_a_hint_only_on_auto_meshes():
    x = jnp.ones((4, 16, 64))
    names = ("batch", "length", "embed")
    assert sharding.constrain(x, names) is x  # no mesh set
    explicit = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Explicit,) * 3)
    with jax.set_mesh(explicit):
        assert sharding.constrain(x, names) is x
    with jax.set_mesh(sharding.make_mesh((2, 2, 2))):
        y = jax.jit(lambda x: sharding.constrain(x, names))(x)
    assert y.sharding.spec[0] == ("data", "fsdp") and all(a is None for a in y.sharding.spec[1:])

"""Value, reward and implicit heads: shapes, logical axes, read positions, implicit values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import heads
from prefopt_jax.tokenmdp import implicit


def _partition_names(module):
    """{path: logical names} of every parameter."""
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names["/".join(map(str, path))] = var.get_metadata()["out_sharding"]
    return names


def test_value_head_shape_dtype_and_axes():
    head = heads.ValueHead(8, rngs=nnx.Rngs(0))
    hidden_btd = jax.random.normal(jax.random.key(1), (3, 5, 8), jnp.bfloat16)
    values_bt = head(hidden_btd)
    assert values_bt.shape == (3, 5) and values_bt.dtype == jnp.float32
    assert _partition_names(head) == {"out/kernel": ("embed", None), "out/bias": (None,)}


def test_value_head_mlp_axes_and_per_position():
    head = heads.ValueHead(8, mlp_dim=16, rngs=nnx.Rngs(0))
    assert _partition_names(head) == {
        "mlp/kernel": ("embed", "mlp"), "mlp/bias": ("mlp",),
        "out/kernel": ("mlp", None), "out/bias": (None,)}
    hidden_btd = jax.random.normal(jax.random.key(1), (2, 4, 8))
    values_bt = head(hidden_btd)
    # A value reads only its own position's hidden state.
    np.testing.assert_allclose(head(hidden_btd[:, 2:3])[:, 0], values_bt[:, 2], rtol=1e-6)


def test_value_head_trains_under_split_merge():
    head = heads.ValueHead(4, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(head)
    hidden_btd = jax.random.normal(jax.random.key(2), (2, 3, 4))
    target_bt = jnp.arange(6.0).reshape(2, 3)

    @jax.jit
    def loss(params):
        return jnp.mean((nnx.merge(graphdef, params)(hidden_btd) - target_bt) ** 2)

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_reward_head_reads_the_last_completion_token():
    head = heads.RewardHead(6, rngs=nnx.Rngs(0))
    hidden_btd = jax.random.normal(jax.random.key(3), (3, 5, 6))
    mask_bt = jnp.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]])
    scores_b = head(hidden_btd, mask_bt=mask_bt)
    assert scores_b.shape == (3,) and scores_b.dtype == jnp.float32
    want_b = [head(hidden_btd[b:b + 1, t:t + 1], index_b=[0])[0]
              for b, t in enumerate([2, 4, 3])]
    np.testing.assert_allclose(scores_b, want_b, rtol=1e-6)
    np.testing.assert_allclose(head(hidden_btd, index_b=jnp.array([2, 4, 3])), scores_b)
    # Other positions do not matter.
    changed_btd = hidden_btd.at[0, 3].set(100.0).at[2, 4].set(-100.0).at[1, 0].set(5.0)
    np.testing.assert_allclose(head(changed_btd, mask_bt=mask_bt), scores_b, rtol=1e-6)
    assert _partition_names(head) == {"out/kernel": ("embed", None), "out/bias": (None,)}


def test_reward_head_needs_exactly_one_locator():
    head = heads.RewardHead(4, rngs=nnx.Rngs(0))
    hidden_btd = jnp.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="exactly one"):
        head(hidden_btd)
    with pytest.raises(ValueError, match="exactly one"):
        head(hidden_btd, mask_bt=jnp.ones((1, 2)), index_b=jnp.zeros(1, jnp.int32))


def test_last_index():
    mask_bt = jnp.array([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(heads.last_index(mask_bt), [1, 0, 2])


def test_implicit_head_is_parameter_free_and_consistent():
    head = heads.ImplicitHead(beta=0.5)
    assert not jax.tree.leaves(nnx.state(head))
    key_a, key_b, key_c = jax.random.split(jax.random.key(4), 3)
    logits_btv = jax.random.normal(key_a, (2, 4, 7))
    ref_btv = jax.random.normal(key_b, (2, 4, 7))
    tokens_bt = jax.random.randint(key_c, (2, 4), 0, 7)
    mask_bt = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.float32)
    out = head(logits_btv, ref_btv, tokens_bt, mask_bt)
    for field in ("rewards_bt", "q_bt", "values_bt", "advantages_bt", "kl_bt"):
        assert getattr(out, field).shape == (2, 4)
        np.testing.assert_array_equal(getattr(out, field)[0, 3], 0.0)
    logps_bt = implicit.take(jax.nn.log_softmax(logits_btv), tokens_bt)
    ref_logps_bt = implicit.take(jax.nn.log_softmax(ref_btv), tokens_bt)
    np.testing.assert_allclose(out.rewards_bt, 0.5 * (logps_bt - ref_logps_bt) * mask_bt,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head.rewards(logps_bt, ref_logps_bt, mask_bt), out.rewards_bt,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.advantages_bt, 0.5 * logps_bt * mask_bt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.q_bt - out.values_bt, out.advantages_bt, atol=1e-5)
    want_v_bt = 0.5 * (jax.nn.logsumexp(logits_btv, -1) - jax.nn.logsumexp(ref_btv, -1))
    np.testing.assert_allclose(out.values_bt, want_v_bt * mask_bt, rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(out.kl_bt >= 0))

"""``Transformer.__call__`` without positions uses 0..T-1 per row (after the cache's index)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx


@nnx.jit
def forward(model, tokens_bt, positions_bt=None):
    return model(tokens_bt, positions_bt)


@nnx.jit
def cached(model, tokens_bt, cache):
    return model(tokens_bt, cache=cache)


def test_default_positions_are_arange(tiny_model):
    model = tiny_model(seed=3)
    tokens_bt = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)), jnp.int32)
    positions_bt = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    explicit = forward(model, tokens_bt, positions_bt)
    np.testing.assert_array_equal(np.asarray(forward(model, tokens_bt)), np.asarray(explicit))
    # Other positions change the logits, so the default is not simply ignored.
    assert not np.allclose(np.asarray(forward(model, tokens_bt, positions_bt + 3)),
                           np.asarray(explicit))


def test_default_positions_continue_after_the_cache_index(tiny_model):
    """Prefill 4 tokens, then 2 more, without positions: the same logits as one full forward
    (positions restarting at 0 after the prefill would change the last two)."""
    model = tiny_model(seed=3)
    tokens_bt = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 6)), jnp.int32)
    cache = model.init_cache(2, 8)
    prefill, cache = cached(model, tokens_bt[:, :4], cache)
    step, _ = cached(model, tokens_bt[:, 4:], cache)
    full = np.asarray(forward(model, tokens_bt))
    np.testing.assert_allclose(np.asarray(prefill), full[:, :4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(step), full[:, 4:], rtol=1e-5, atol=1e-5)

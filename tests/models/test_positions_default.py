"""``Transformer.__call__`` without positions uses 0..T-1 per row (after the cache's index)."""

import jax.numpy as jnp
import numpy as np


def test_default_positions_are_arange(tiny_model):
    model = tiny_model(seed=3)
    tokens_bt = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)), jnp.int32)
    positions_bt = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    explicit = model(tokens_bt, positions_bt)
    np.testing.assert_array_equal(np.asarray(model(tokens_bt)), np.asarray(explicit))
    # Other positions change the logits, so the default is not simply ignored.
    assert not np.allclose(np.asarray(model(tokens_bt, positions_bt + 3)), np.asarray(explicit))


def test_default_positions_continue_after_the_cache_index(tiny_model):
    model = tiny_model(seed=3)
    tokens_bt = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 6)), jnp.int32)
    positions_bt = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    runs = []
    for positions in (positions_bt, None):
        cache = model.init_cache(2, 8)
        prefill, cache = model(tokens_bt[:, :4], None if positions is None
                               else positions[:, :4], cache=cache)
        step, _ = model(tokens_bt[:, 4:], None if positions is None else positions[:, 4:],
                        cache=cache)
        runs.append((np.asarray(prefill), np.asarray(step)))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=0, atol=0)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=0, atol=0)
    full = np.asarray(model(tokens_bt))
    np.testing.assert_allclose(runs[1][1], full[:, 4:], rtol=1e-5, atol=1e-5)

"""KV cache: chunked prefill + token-by-token decode of left-padded prompts == one full forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models.hf import model_from_params

PROMPT_LENGTHS = (5, 2, 8)
WIDTH, N_NEW, SLOTS = 8, 3, 16  # left-padded prompt width, decoded tokens, cache length


@nnx.jit
def cached_call(model, cache, tokens_bt, positions_bt, segment_ids_bt):
    return model(tokens_bt, positions_bt, segment_ids_bt, cache=cache)


def left_padded_batch(seed=0):
    """tokens, positions, segment_ids ``[3, WIDTH + N_NEW]``: padding (segment 0) then the text."""
    rng = np.random.default_rng(seed)
    rows = len(PROMPT_LENGTHS)
    tokens = np.zeros((rows, WIDTH + N_NEW), np.int32)
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for b, n in enumerate(PROMPT_LENGTHS):
        pad = WIDTH - n
        tokens[b, pad:] = rng.integers(1, 128, n + N_NEW)
        positions[b, pad:] = np.arange(n + N_NEW)
        segments[b, pad:] = 1
    return tokens, positions, segments


@pytest.mark.parametrize("scan_layers", [False, True])
def test_prefill_and_decode_match_full_forward(scan_layers, tiny_model, tiny_params, forward):
    plain = tiny_model(seed=3)
    # The same parameters in the layout under test; the reference is always the plain forward.
    model = model_from_params(dataclasses.replace(plain.config, scan_layers=scan_layers),
                              tiny_params(plain.config, seed=3))
    tokens, positions, segments = left_padded_batch()
    full = np.asarray(forward(plain, jnp.asarray(tokens), jnp.asarray(positions),
                              jnp.asarray(segments)))
    cache = model.init_cache(len(PROMPT_LENGTHS), SLOTS)
    # One buffer per layer [B, K, S, E] (written in place); scanned layers share a stacked one.
    shapes = [x.shape for x in jax.tree.leaves(cache["k"])]
    assert shapes == ([(2, 3, 2, SLOTS, 16)] if scan_layers else [(3, 2, SLOTS, 16)] * 2)
    assert int(cache["index"]) == 0
    got = []
    # Prefill in two equal chunks (one compile, second at a non-zero index), then decode one
    # column at a time.
    for start, stop in [(0, 4), (4, WIDTH)] + [(t, t + 1) for t in range(WIDTH, WIDTH + N_NEW)]:
        cols = slice(start, stop)
        logits, cache = cached_call(model, cache, jnp.asarray(tokens[:, cols]),
                                    jnp.asarray(positions[:, cols]), jnp.asarray(segments[:, cols]))
        assert int(cache["index"]) == stop
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = segments == 1
    np.testing.assert_allclose(got[real], full[real], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache["segment_ids"])[:, :WIDTH + N_NEW], segments)
    assert np.all(np.asarray(cache["segment_ids"])[:, WIDTH + N_NEW:] == 0)


def test_cache_is_a_jittable_pytree(tiny_model):
    """The cache crosses jax.jit boundaries as a plain dict with a traced index."""
    model = tiny_model(seed=3)
    cache = model.init_cache(2, 8, dtype=jnp.bfloat16)
    assert set(cache) == {"k", "v", "segment_ids", "branch_ids", "index"}
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cache["k"]))
    leaves = jax.tree.leaves(cache)
    assert all(isinstance(x, jax.Array) for x in leaves)


def test_float32_cache_of_a_bf16_model_gives_the_bf16_cache_results(tiny_model):
    """The sampler's float32 cache (on CPU) stores a bf16 model's keys exactly and attention
    reads them in float32 either way, so prefill and decode give bit-identical logits to a bf16
    cache, and the layers keep computing in bf16 (a float32 cache must not widen the stream)."""
    model = tiny_model(seed=3, dtype=jnp.bfloat16)
    tokens, positions, segments = (jnp.asarray(x) for x in left_padded_batch())
    runs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        cache, got = model.init_cache(len(PROMPT_LENGTHS), SLOTS, dtype=dtype), []
        for start, stop in [(0, WIDTH)] + [(t, t + 1) for t in range(WIDTH, WIDTH + N_NEW)]:
            logits, cache = cached_call(model, cache, tokens[:, start:stop],
                                        positions[:, start:stop], segments[:, start:stop])
            assert logits.dtype == jnp.bfloat16
            got.append(np.asarray(logits.astype(jnp.float32)))
        assert all(x.dtype == dtype for x in jax.tree.leaves(cache["k"]))
        runs.append(np.concatenate(got, axis=1))
    np.testing.assert_array_equal(runs[0], runs[1])

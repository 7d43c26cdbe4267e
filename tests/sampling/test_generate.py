"""Contract tests for `prefopt_jax.sampling.generate` on a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import ModelConfig, Transformer
from prefopt_jax.sampling.generate import SamplingConfig, categorical, filter_logits, generate

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    return Transformer(config, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, positions):
    return model(tokens, positions)


def greedy_without_cache(model, prompt, n_new, width=16):
    """Reference: re-runs the full forward on the growing sequence, no KV cache.

    The sequence is right-padded to `width` (one compiled shape); causal attention keeps the
    padding out of every real position's logits.
    """
    seq = list(prompt)
    logps = []
    for _ in range(n_new):
        assert len(seq) <= width
        tokens = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
        positions = jnp.arange(width, dtype=jnp.int32)[None]
        logits = _forward(model, tokens, positions)[0, len(seq) - 1]
        logp_v = jax.nn.log_softmax(logits.astype(jnp.float32))
        seq.append(int(jnp.argmax(logp_v)))
        logps.append(float(logp_v[seq[-1]]))
    return seq[len(prompt):], logps


def test_greedy_matches_uncached_forward_for_ragged_batch(model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 1, 4, 1]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert out.tokens_bn.shape == (3, 6) and out.logps_bn.shape == (3, 6)
    for row, prompt in enumerate(prompts):
        want_tokens, want_logps = greedy_without_cache(model, prompt, 6)
        np.testing.assert_array_equal(out.tokens_bn[row], want_tokens)
        np.testing.assert_allclose(out.logps_bn[row], want_logps, atol=1e-4)
    np.testing.assert_array_equal(out.lengths_b, [6, 6, 6])


def test_stop_token_ends_row_and_masks_rest(model):
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=5, temperature=0.0))
    stop = int(free.tokens_bn[0, 1])  # the second greedy token of row 0
    out = generate(model, prompts, SamplingConfig(max_new_tokens=5, temperature=0.0,
                                                  stop_ids=(stop,)), pad_id=-1)
    first = int(np.argmax(free.tokens_bn[0] == stop))
    assert out.lengths_b[0] == first + 1
    assert out.tokens_bn[0, first] == stop
    assert np.all(out.tokens_bn[0, first + 1:] == -1)
    assert np.all(out.mask_bn[0, first + 1:] == 0) and np.all(out.logps_bn[0, first + 1:] == 0)


def test_seed_determinism_and_variety(model):
    prompts = [[1, 2, 3]] * 4
    config = SamplingConfig(max_new_tokens=8, temperature=1.0)
    a = generate(model, prompts, config, rng=7)
    b = generate(model, prompts, config, rng=7)
    c = generate(model, prompts, config, rng=8)
    np.testing.assert_array_equal(a.tokens_bn, b.tokens_bn)
    assert not np.array_equal(a.tokens_bn, c.tokens_bn)
    # Plain temperature-1 sampling: the sampled distribution is the model's.
    np.testing.assert_allclose(a.sample_logps_bn, a.logps_bn, atol=1e-5)


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    prompts = [[4, 5, 6], [7]]
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=5, temperature=0.0))
    for config in (SamplingConfig(max_new_tokens=5, top_k=1),
                   SamplingConfig(max_new_tokens=5, top_p=1e-6)):
        out = generate(model, prompts, config, rng=3)
        np.testing.assert_array_equal(out.tokens_bn, greedy.tokens_bn)
        np.testing.assert_allclose(out.sample_logps_bn, 0.0, atol=1e-6)


def test_filter_logits_top_k_top_p_by_hand():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    kept_k = filter_logits(logits, SamplingConfig(top_k=2))
    np.testing.assert_array_equal(np.isfinite(kept_k), [[True, True, False, False]])
    # top_p = 0.75: 0.5 alone is short of it, so the 0.3 token is kept too; 0.8 covers it.
    kept_p = filter_logits(logits, SamplingConfig(top_p=0.75))
    np.testing.assert_array_equal(np.isfinite(kept_p), [[True, True, False, False]])
    kept_p2 = filter_logits(logits, SamplingConfig(top_p=0.85))
    np.testing.assert_array_equal(np.isfinite(kept_p2), [[True, True, True, False]])


@pytest.mark.parametrize("block", [8, 64])
def test_two_stage_categorical_draws_the_softmax(block):
    """Block, then token in the block: the draws' frequencies are softmax(logits) (a chi-square
    test at the 1e-4 level), filtered tokens and the padded tail of the last block never come,
    and one key gives one token."""
    v, n = 50, 40_000  # 50 = 6 blocks of 8 and 2 padding slots; one block of 64
    logits = jax.random.normal(jax.random.key(0), (v,)) * 1.5
    logits = logits.at[jnp.asarray([3, 17, 49])].set(-jnp.inf)
    keys = jax.random.split(jax.random.key(1), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: categorical(k, logits, block)))(keys))
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    counts = np.bincount(draws, minlength=v)
    assert counts.size == v and counts[[3, 17, 49]].sum() == 0
    live = p > 0
    chi2 = float(np.sum((counts[live] - n * p[live]) ** 2 / (n * p[live])))
    assert chi2 < 90.5, chi2  # the 1e-4 quantile of chi-square with 46 degrees of freedom
    assert int(categorical(keys[0], logits, block)) == int(draws[0])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        from prefopt_jax.sampling.generate import left_pad
        left_pad([[1], []])


def test_finished_rows_are_compacted_away_without_changing_any_row(model):
    """The decode halves its batch as rows finish (32 -> 16 -> 8 rows here); every row's
    tokens and log-probs are those of the loop that keeps all 32 rows to the end."""
    import functools

    from prefopt_jax.sampling import generate as gen

    prompts, g, n_new = [[5, 9, 14], [3], [7, 7, 2, 8, 1], [4, 4]], 8, 20
    config = SamplingConfig(max_new_tokens=n_new, stop_ids=tuple(range(10, 22)))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(32))
    graphdef, state = nnx.split(model)
    tokens_bt, positions_bt, segment_ids_bt = gen.left_pad(prompts)

    def run(reorder):
        m = nnx.merge(graphdef, state)
        logits_bv, st = gen.prefill(m, tokens_bt, positions_bt, segment_ids_bt,
                                    tokens_bt.shape[1] + n_new)
        index_b = jnp.repeat(jnp.arange(len(prompts)), g)
        logits_bv, st = logits_bv[index_b], gen.reorder_state(st, index_b)
        step_fn = functools.partial(gen.model_step, m)
        return gen.sample_loop(step_fn, logits_bv, st, config, keys, 0, reorder)

    assert gen.compaction_sizes(32, keys, gen.reorder_state) == [32, 16, 8]
    assert gen.compaction_sizes(32, jax.random.key(0), gen.reorder_state) == [32]
    whole = jax.device_get(jax.jit(lambda: run(None))())
    compact = jax.device_get(jax.jit(lambda: run(gen.reorder_state))())
    lengths = np.sort(whole[3].sum(axis=1))[::-1]
    # Fewer than 8 rows were still sampling before the last token: the 8-row phase ran.
    assert lengths[8] < lengths[0]
    np.testing.assert_array_equal(compact[0], whole[0])
    np.testing.assert_array_equal(compact[3], whole[3])
    np.testing.assert_allclose(compact[1], whole[1], atol=1e-5)
    np.testing.assert_allclose(compact[2], whole[2], atol=1e-5)


def test_groups_share_the_prompt_cache_and_draw_per_sample_keys(model):
    """G samples per prompt from one prefill equal sampling the prompt G times, row for row,
    and a sample depends on its own key only: the same key gives the same sample in another
    batch. The sampler's log-probs are the model's teacher-forced log-probs of the sample."""
    from prefopt_jax.sampling.generate import generate_groups

    prompts, g = [[5, 9, 14], [3], [7, 7, 2, 8, 1]], 3
    config = SamplingConfig(max_new_tokens=6, temperature=0.9, top_k=50, stop_ids=(11,))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.arange(9))
    grouped = generate_groups(model, prompts, g, config, keys)
    repeated = generate(model, [p for p in prompts for _ in range(g)], config, rng=keys)
    np.testing.assert_array_equal(grouped.tokens_bn, repeated.tokens_bn)
    np.testing.assert_allclose(grouped.logps_bn, repeated.logps_bn, atol=1e-5)
    assert len({tuple(t) for t in grouped.tokens_bn[:g]}) > 1  # the group's samples differ
    alone = generate_groups(model, prompts[2:], g, config, keys[6:])
    np.testing.assert_array_equal(alone.tokens_bn, grouped.tokens_bn[6:])
    for n in (0, 4, 8):
        prompt, new = prompts[n // g], grouped.tokens_bn[n, :grouped.lengths_b[n]]
        seq = jnp.asarray([prompt + [int(t) for t in new]])
        logits = _forward(model, seq, jnp.arange(seq.shape[1])[None])
        logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)
        want = logp[len(prompt) - 1:-1][jnp.arange(len(new)), new]
        np.testing.assert_allclose(grouped.logps_bn[n, :len(new)], want, atol=2e-5)
    with pytest.raises(ValueError, match="one key per sample"):
        generate_groups(model, prompts, g, config, keys[:4])


def test_min_new_tokens_bans_the_stop_ids_until_then(model):
    """Before `min_new_tokens` no stop id is drawn, and the sampled distribution is the model's
    without them: `sample_logp = logp - log(1 - P(stop ids))` there, `= logp` after. Greedy
    decoding takes the best token that is not a stop id. Off (0), rows stop early."""
    prompts, stops, n_new = [[5, 9, 14], [3], [7, 7, 2, 8, 1], [4, 4]], tuple(range(10, 40)), 8
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(4))
    free = generate(model, prompts, SamplingConfig(max_new_tokens=n_new, stop_ids=stops),
                    rng=keys)
    assert free.lengths_b.min() < 4  # with 30 of 97 tokens stopping, some row stops early
    banned = generate(model, prompts, SamplingConfig(max_new_tokens=n_new, stop_ids=stops,
                                                     min_new_tokens=4), rng=keys)
    assert banned.lengths_b.min() >= 4
    assert not np.isin(banned.tokens_bn[:, :4], stops).any()
    for row, prompt in enumerate(prompts):
        new = [int(t) for t in banned.tokens_bn[row, :banned.lengths_b[row]]]
        seq = jnp.asarray([prompt + new])
        logits = _forward(model, seq, jnp.arange(seq.shape[1])[None])[0]
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
        logp = logp[len(prompt) - 1:-1]
        stop_mass = np.exp(logp[:, list(stops)]).sum(-1)
        want = logp[np.arange(len(new)), new]
        np.testing.assert_allclose(banned.logps_bn[row, :len(new)], want, atol=2e-5)
        shift = np.where(np.arange(len(new)) < 4, np.log1p(-stop_mass), 0.0)
        np.testing.assert_allclose(banned.sample_logps_bn[row, :len(new)], want - shift,
                                   atol=2e-5)
    full = generate(model, prompts, SamplingConfig(max_new_tokens=n_new, temperature=0.0,
                                                   stop_ids=stops, min_new_tokens=n_new))
    np.testing.assert_array_equal(full.lengths_b, [n_new] * 4)
    assert not np.isin(full.tokens_bn, stops).any()
    for row, prompt in enumerate(prompts):  # the first greedy token: the best non-stop one
        logits = np.asarray(_forward(model, jnp.asarray([prompt]),
                                     jnp.arange(len(prompt))[None])[0, -1], np.float32).copy()
        logits[list(stops)] = -np.inf
        assert full.tokens_bn[row, 0] == np.argmax(logits)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingConfig(max_new_tokens=4, min_new_tokens=5)

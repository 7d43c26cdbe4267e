"""Search loops of `prefopt_jax.sampling.search` on the exact tabular token MDP.

The loops are the same functions the Transformer runs (`beam_loop`, `sample_loop`,
`rso_accept`); only the policy differs (`tabular_policy`), so exact answers check the search logic.
"""

import functools

import jax
import numpy as np
import pytest

from prefopt_jax.sampling import generate as gen
from prefopt_jax.sampling import search
from prefopt_jax.tokenmdp import tabular


def run_beams(logits_pnv, tree, width, alpha=0.0):
    """Beam search for every prompt of a tabular policy through `search.beam_loop`."""
    num_p = logits_pnv.shape[0]
    logits_qv, state, step_fn, reorder_fn = search.tabular_policy(
        logits_pnv, np.repeat(np.arange(num_p), width), tree.vocab_size)
    config = search.BeamConfig(num_beams=width, max_new_tokens=tree.horizon, length_penalty=alpha)
    return jax.device_get(search.beam_loop(step_fn, reorder_fn, logits_qv, state, config))


@functools.partial(jax.jit, static_argnames=("vocab_size", "horizon", "rows"))
def sample_codes(logits_pnv, rng, *, vocab_size, horizon, rows):
    """Response indices of `rows` samples of prompt 0 through `generate.sample_loop`."""
    logits_bv, state, step_fn, _ = search.tabular_policy(
        logits_pnv, np.zeros(rows, np.int32), vocab_size)
    config = gen.SamplingConfig(max_new_tokens=horizon, temperature=1.0)
    tokens_bh = gen.sample_loop(step_fn, logits_bv, state, config, rng, pad_id=0)[0]
    return tokens_bh @ (vocab_size ** np.arange(horizon - 1, -1, -1))


def total_variation(codes, logps_s):
    freq_s = np.bincount(codes, minlength=logps_s.size) / codes.size
    return 0.5 * np.abs(freq_s - np.exp(logps_s)).sum()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_full_width_beam_is_the_exact_ranking(alpha):
    mdp = tabular.random_mdp(vocab_size=3, horizon=3, num_prompts=2, seed=1)
    tree = mdp.tree
    tokens_pwh, logps_pwh, lengths_pw, scores_pw, sums_pw = run_beams(
        mdp.ref_logits_pnv, tree, tree.num_sequences, alpha)
    want_s_pw, want_logps_pw = tabular.top_k(
        tabular.sequence_logps(mdp.ref_logits_pnv, tree), tree.num_sequences)
    np.testing.assert_array_equal(tokens_pwh, tree.tokens_sh[want_s_pw])
    np.testing.assert_allclose(sums_pw, want_logps_pw, atol=1e-5)
    np.testing.assert_allclose(logps_pwh.sum(-1), sums_pw, atol=1e-5)
    # Fixed horizon: the length penalty divides every beam by the same H^alpha.
    np.testing.assert_allclose(scores_pw, sums_pw / tree.horizon ** alpha, atol=1e-5)
    assert np.all(lengths_pw == tree.horizon)


def test_narrow_beam_matches_the_tabular_reference():
    mdp = tabular.random_mdp(vocab_size=3, horizon=4, num_prompts=2, ref_scale=2.0, seed=4)
    tokens_pwh, _, _, _, sums_pw = run_beams(mdp.ref_logits_pnv, mdp.tree, 3)
    for p in range(2):
        want_wh, want_w = tabular.beam_search(mdp.ref_logits_pnv, mdp.tree, 3, prompt=p)
        np.testing.assert_array_equal(tokens_pwh[p], want_wh)
        np.testing.assert_allclose(sums_pw[p], want_w, atol=1e-5)


def test_rso_accepts_from_the_tilted_distribution():
    mdp = tabular.random_mdp(vocab_size=2, horizon=3, num_prompts=1, beta=1.0, ref_scale=0.3,
                             seed=2)
    replicas, n = 4000, 64
    codes_q = np.asarray(sample_codes(mdp.ref_logits_pnv, jax.random.key(0), vocab_size=2,
                                      horizon=3, rows=replicas * n))
    rewards_rn = tabular.sequence_rewards(mdp)[0][codes_q].reshape(replicas, n)
    index_rk = np.asarray(search.rso_accept(rewards_rn, jax.random.key(1), mdp.beta, num_accept=1))
    accepted = np.take_along_axis(codes_q.reshape(replicas, n), index_rk, axis=1)[:, 0]
    tilted_s = tabular.optimal_sequence_logps(mdp)[0]  # pi_ref exp(R / b), normalised
    assert total_variation(accepted, tilted_s) < 0.03
    # Far from the proposal: the test can tell the two apart.
    assert total_variation(accepted, tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree)[0]) > 0.1


def test_rso_accepts_k_distinct_candidates_and_always_the_maximum_first_round():
    rewards_bn = np.asarray([[0.0, 5.0, 1.0, 4.9, -3.0], [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    index_bk = np.asarray(search.rso_accept(rewards_bn, jax.random.key(3), 0.01, num_accept=3))
    assert index_bk.shape == (2, 3)
    assert all(len(set(row)) == 3 for row in index_bk)
    # With a tiny beta only the current maximum passes: rounds accept 5.0, 4.9, 1.0 in turn.
    np.testing.assert_array_equal(index_bk[0], [1, 3, 2])
    # Equal rewards all pass in the first round, in candidate order, up to k.
    np.testing.assert_array_equal(index_bk[1], [0, 1, 2])


def test_best_of_n_matches_its_exact_distribution_and_the_kl_bound():
    mdp = tabular.random_mdp(vocab_size=2, horizon=3, num_prompts=1, ref_scale=0.5, seed=3)
    replicas, n = 4000, 4
    codes_q = np.asarray(sample_codes(mdp.ref_logits_pnv, jax.random.key(5), vocab_size=2,
                                      horizon=3, rows=replicas * n))
    rewards_s = tabular.sequence_rewards(mdp)[0]
    codes_rn = codes_q.reshape(replicas, n)
    best = np.take_along_axis(codes_rn, search.best_of_n_select(rewards_s[codes_rn])[:, None],
                              axis=1)[:, 0]
    ref_s = np.exp(tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree)[0])
    # P(best = y) = F(y)^N - F(<y)^N with F the reference CDF in reward order (distinct rewards).
    order = np.argsort(rewards_s)
    cdf = np.cumsum(ref_s[order])
    exact_s = np.empty_like(ref_s)
    exact_s[order] = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
    assert total_variation(best, np.log(exact_s)) < 0.03
    bound = np.log(n) - (n - 1) / n
    freq_s = np.bincount(best, minlength=ref_s.size) / replicas
    seen = freq_s > 0
    empirical_kl = np.sum(freq_s[seen] * np.log(freq_s[seen] / ref_s[seen]))
    assert np.sum(exact_s * np.log(exact_s / ref_s)) <= bound
    assert empirical_kl <= bound + 0.02

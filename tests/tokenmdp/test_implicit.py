"""Implicit rewards, returns, KL and soft values: hand-computed cases and the tabular solver."""

import math

import jax
import numpy as np
import pytest

from prefopt_jax.tokenmdp import implicit, tabular

LOGPS_BT = np.array([[-1.0, -2.0, -3.0, -0.5]])
REF_LOGPS_BT = np.array([[-1.5, -1.0, -3.0, -9.0]])
MASK_BT = np.array([[1.0, 1.0, 1.0, 0.0]])


def test_token_rewards_hand_computed():
    rewards_bt = implicit.token_rewards(LOGPS_BT, REF_LOGPS_BT, MASK_BT, beta=0.5)
    np.testing.assert_allclose(rewards_bt, [[0.25, -0.5, 0.0, 0.0]], atol=1e-7)
    total_b = implicit.sequence_rewards(LOGPS_BT, REF_LOGPS_BT, MASK_BT, beta=0.5)
    np.testing.assert_allclose(total_b, [-0.25], atol=1e-7)


def test_returns_hand_computed():
    rewards_bt = np.array([[1.0, 2.0, 3.0, 100.0], [0.0, 5.0, -1.0, 7.0]])
    mask_bt = np.array([[1, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_allclose(implicit.cumulative_returns(rewards_bt, mask_bt),
                               [[1, 3, 6, 0], [0, 5, 4, 11]])
    np.testing.assert_allclose(implicit.returns_to_go(rewards_bt, mask_bt),
                               [[6, 5, 3, 0], [0, 11, 6, 7]])


def test_kl_estimators_hand_computed():
    d = -0.5 - (-1.0)
    for name, want in [("k1", d), ("k2", 0.5 * d * d), ("k3", math.exp(-d) - 1 + d)]:
        kl_bt = implicit.token_kl_estimate([[-0.5, 0.0]], [[-1.0, 0.0]], [[1.0, 0.0]], name)
        np.testing.assert_allclose(kl_bt, [[want, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="k4"):
        implicit.token_kl_estimate(LOGPS_BT, REF_LOGPS_BT, MASK_BT, "k4")


def test_token_kl_exact_and_offset_invariant():
    rng = np.random.default_rng(0)
    logits_btv, ref_btv = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    p_btv = np.exp(logits_btv) / np.exp(logits_btv).sum(-1, keepdims=True)
    q_btv = np.exp(ref_btv) / np.exp(ref_btv).sum(-1, keepdims=True)
    want_bt = (p_btv * np.log(p_btv / q_btv)).sum(-1)
    mask_bt = np.ones((2, 3))
    np.testing.assert_allclose(implicit.token_kl(logits_btv, ref_btv, mask_bt), want_bt, rtol=1e-5)
    # Logits are defined up to a per-position constant.
    shifted_btv = logits_btv + rng.normal(size=(2, 3, 1))
    np.testing.assert_allclose(implicit.token_kl(shifted_btv, ref_btv, mask_bt), want_bt,
                               rtol=1e-5)
    np.testing.assert_allclose(implicit.token_kl(ref_btv, ref_btv, mask_bt), 0.0, atol=1e-6)


def test_soft_values_hand_computed():
    # pi = (1/4, 3/4), pi_ref uniform, b = 1: Q = z - logsumexp z_ref, V = log 4 - log 2.
    logits_btv = np.array([[[0.0, math.log(3.0)]]])
    ref_btv = np.zeros((1, 1, 2))
    q_btv = implicit.q_values(logits_btv, ref_btv, beta=1.0)
    np.testing.assert_allclose(q_btv, [[[-math.log(2), math.log(1.5)]]], rtol=1e-6)
    values_bt = implicit.soft_values(q_btv, beta=1.0)
    np.testing.assert_allclose(values_bt, [[math.log(2.0)]], rtol=1e-6)
    np.testing.assert_allclose(implicit.advantages(q_btv, values_bt),
                               [[[math.log(0.25), math.log(0.75)]]], rtol=1e-6)
    # The reward part b (z - z_ref) with the reference folded in gives the same V.
    reward_part_btv = 1.0 * (logits_btv - ref_btv)
    ref_logps_btv = np.log(np.full((1, 1, 2), 0.5))
    np.testing.assert_allclose(implicit.soft_values(reward_part_btv, 1.0, ref_logps_btv),
                               values_bt, rtol=1e-6)
    np.testing.assert_allclose(implicit.action_rewards(logits_btv, ref_btv, 2.0),
                               [[[2 * math.log(0.5), 2 * math.log(1.5)]]], rtol=1e-6)


def test_values_read_the_logit_offset_and_advantages_do_not():
    ref_btv = np.random.default_rng(1).normal(size=(2, 4, 6))
    q_btv = implicit.q_values(ref_btv, ref_btv, beta=0.3)
    np.testing.assert_allclose(implicit.soft_values(q_btv, 0.3), 0.0, atol=1e-6)
    shifted_q_btv = implicit.q_values(ref_btv + 2.0, ref_btv, beta=0.3)
    shifted_v_bt = implicit.soft_values(shifted_q_btv, 0.3)
    np.testing.assert_allclose(shifted_v_bt, 0.6, atol=1e-5)
    np.testing.assert_allclose(implicit.advantages(shifted_q_btv, shifted_v_bt),
                               0.3 * jax.nn.log_softmax(ref_btv), atol=1e-5)


def _paths(mdp):
    """Prompt, node and token of every response's steps, as [P*S, H] arrays."""
    tree = mdp.tree
    num_p, num_s = mdp.num_prompts, tree.num_sequences
    prompt_bh = np.repeat(np.arange(num_p), num_s)[:, None].repeat(tree.horizon, 1)
    return prompt_bh, np.tile(tree.nodes_sh, (num_p, 1)), np.tile(tree.tokens_sh, (num_p, 1))


def test_logits_equal_to_q_star_recover_the_mdp():
    """Policy logits Q*/b read as Q-values give V*, b log pi* and, via Bellman, the true reward."""
    mdp = tabular.random_mdp(vocab_size=3, horizon=3, num_prompts=2, beta=0.7, seed=3)
    sol = tabular.solve(mdp)
    prompt_bh, nodes_bh, tokens_bh = _paths(mdp)
    logits_bhv = sol.q_pnv[prompt_bh, nodes_bh] / mdp.beta
    ref_bhv = mdp.ref_logps_pnv[prompt_bh, nodes_bh]
    mask_bh = np.ones(nodes_bh.shape)
    q_bhv = implicit.q_values(logits_bhv, ref_bhv, mdp.beta)
    values_bh = implicit.soft_values(q_bhv, mdp.beta)
    np.testing.assert_allclose(values_bh, sol.values_pm[prompt_bh, nodes_bh], atol=1e-5)
    q_bh = implicit.take(q_bhv, tokens_bh)
    ref_logps_bh = implicit.take(ref_bhv, tokens_bh)
    reward_bh = implicit.bellman_rewards(q_bh, values_bh, ref_logps_bh, mask_bh, mdp.beta)
    np.testing.assert_allclose(reward_bh, mdp.reward_pnv[prompt_bh, nodes_bh, tokens_bh],
                               atol=1e-5)
    # Token implicit rewards are the true rewards shaped by V*, and they telescope.
    logps_bh = implicit.take(jax.nn.log_softmax(logits_bhv), tokens_bh)
    rhat_bh = implicit.token_rewards(logps_bh, ref_logps_bh, mask_bh, mdp.beta)
    next_bh = implicit.next_values(sol.values_pm[prompt_bh, nodes_bh], mask_bh)
    shaped_bh = reward_bh + next_bh - sol.values_pm[prompt_bh, nodes_bh]
    np.testing.assert_allclose(rhat_bh, shaped_bh, atol=1e-5)
    total_b = implicit.cumulative_returns(rhat_bh, mask_bh)[:, -1]
    want_b = tabular.sequence_rewards(mdp).reshape(-1) - sol.values_pm[prompt_bh[:, 0], 0]
    np.testing.assert_allclose(total_b, want_b, atol=1e-5)


def test_next_values_stop_at_the_last_real_token():
    values_bt = np.array([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(implicit.next_values(values_bt, [[0, 1, 1, 0]]), [[0, 3, 0, 0]])

"""The exact tabular token MDP: the Q* identity, DPO recovering pi*, IPO/SimPO, the reward decline.

The trained policies come from the registry's losses on PairwiseInputs gathered from tabular
logits (the same functions the language model trains with). The recorded differences between
DPO, IPO and SimPO are reproduced by experiments/tabular_qstar/run.py.
"""

import numpy as np
import pytest

from prefopt_jax.tokenmdp import tabular

BETA = 1.0


@pytest.fixture(scope="module")
def mdp():
    return tabular.random_mdp(vocab_size=3, horizon=3, num_prompts=2, beta=BETA,
                              reward_scale=1.0, ref_scale=0.5, seed=0)


@pytest.fixture(scope="module")
def pairs(mdp):
    return tabular.all_pairs(mdp)


@pytest.fixture(scope="module")
def fitted(mdp, pairs):
    """Policies trained to convergence on the exact expected loss, by loss name."""
    hypers = {"dpo": {"beta": BETA}, "ipo": {"beta": BETA}, "simpo": {}}
    return {name: tabular.fit(mdp, name, pairs, hyper=hyper, steps=150)
            for name, hyper in hypers.items()}


def test_tree_tables():
    tree = tabular.Tree(vocab_size=2, horizon=3)
    assert (tree.num_nodes, tree.num_sequences, tree.num_all_nodes) == (7, 8, 15)
    np.testing.assert_array_equal(tree.tokens_sh[6], [1, 1, 0])
    np.testing.assert_array_equal(tree.nodes_sh[6], [0, 2, 6])  # root, "1", "11"
    np.testing.assert_array_equal(tree.child_nv[2], [5, 6])
    np.testing.assert_array_equal(tree.depth_n, [0, 1, 1, 2, 2, 2, 2])
    # Terminal node of response s is N + s.
    last_sh = tree.child_nv[tree.nodes_sh[:, -1], tree.tokens_sh[:, -1]]
    np.testing.assert_array_equal(last_sh, tree.num_nodes + np.arange(8))


@pytest.mark.parametrize("config", [
    dict(vocab_size=3, horizon=3, num_prompts=2, beta=1.0),
    dict(vocab_size=4, horizon=3, num_prompts=1, beta=0.3, reward_scale=2.0),
    dict(vocab_size=2, horizon=4, num_prompts=3, beta=0.5, terminal_reward=True),
])
def test_identity_holds_at_every_node(config):
    """b log pi*/pi_ref = r + V*(s') - V*(s), with pi* from the token-level solver and,
    independently, from the sequence-level (bandit) solution pi* ∝ pi_ref exp(R/b)."""
    mdp = tabular.random_mdp(seed=7, **config)
    sol = tabular.solve(mdp)
    assert np.abs(tabular.identity_residual_pnv(mdp, sol.values_pm, sol.logps_pnv)).max() < 1e-6
    seq_star_ps = tabular.optimal_sequence_logps(mdp)
    bandit_pnv = tabular.conditionals(seq_star_ps, mdp.tree)
    assert np.abs(tabular.identity_residual_pnv(mdp, sol.values_pm, bandit_pnv)).max() < 1e-6
    # Telescoping: V*(root) = b log E_{pi_ref} exp(R/b), and the policies agree on sequences.
    ref_ps = tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree)
    rewards_ps = tabular.sequence_rewards(mdp)
    root_p = mdp.beta * np.log(np.sum(np.exp(ref_ps + rewards_ps / mdp.beta), axis=-1))
    np.testing.assert_allclose(sol.values_pm[:, 0], root_p, atol=1e-9)
    np.testing.assert_allclose(tabular.sequence_logps(sol.logps_pnv, mdp.tree), seq_star_ps,
                               atol=1e-9)


def test_sequence_quantities(mdp):
    tree = mdp.tree
    ref_ps = tabular.sequence_logps(mdp.ref_logits_pnv, tree)
    np.testing.assert_allclose(np.exp(ref_ps).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(tabular.conditionals(ref_ps, tree), mdp.ref_logps_pnv, atol=1e-12)
    assert tabular.kl(ref_ps, ref_ps) == 0.0
    rewards_ps = tabular.sequence_rewards(mdp)
    assert tabular.win_rate(ref_ps, ref_ps, rewards_ps) == pytest.approx(0.5, abs=1e-12)
    star_ps = tabular.optimal_sequence_logps(mdp)
    assert tabular.win_rate(star_ps, ref_ps, rewards_ps) + tabular.win_rate(
        ref_ps, star_ps, rewards_ps) == pytest.approx(1.0, abs=1e-12)
    # A policy on the best response beats y' unless y' is the best response too (a tie).
    best_p = rewards_ps.argmax(-1)
    greedy_ps = np.full(rewards_ps.shape, -np.inf)
    greedy_ps[np.arange(2), best_p] = 0.0
    want = np.mean(1.0 - 0.5 * np.exp(ref_ps[np.arange(2), best_p]))
    assert tabular.win_rate(greedy_ps, ref_ps, rewards_ps) == pytest.approx(want, abs=1e-12)
    assert tabular.expected_reward(greedy_ps, rewards_ps) == pytest.approx(
        rewards_ps.max(-1).mean())
    order_pj, logps_pj = tabular.top_k(ref_ps, 4)
    assert np.all(np.diff(logps_pj, axis=-1) <= 0)
    np.testing.assert_allclose(logps_pj[:, 0], ref_ps.max(-1))


def test_dpo_on_the_exact_expected_loss_recovers_q_star(mdp, fitted):
    """The paper's central claim: DPO's policy is pi*, its token rewards are r shaped by V*."""
    res = fitted["dpo"]
    assert res.grad_norm_i[-1] < 1e-5
    seq_ps = tabular.sequence_logps(res.logits_pnv, mdp.tree)
    assert tabular.kl(tabular.optimal_sequence_logps(mdp), seq_ps) < 1e-3
    sol = tabular.solve(mdp)
    residual_pnv = tabular.identity_residual_pnv(mdp, sol.values_pm, res.logits_pnv)
    assert np.abs(residual_pnv).max() < 1e-3  # every node, every token


def test_ipo_and_simpo_converge_elsewhere(mdp, fitted):
    """IPO (b=1) stops short of pi* (bounded target margins), SimPO (b=2, gamma/b=0.25, no
    reference) overshoots it; both are converged, so the gaps are their optima, not noise."""
    tree = mdp.tree
    ref_ps = tabular.sequence_logps(mdp.ref_logits_pnv, tree)
    star_ps = tabular.optimal_sequence_logps(mdp)
    rewards_ps = tabular.sequence_rewards(mdp)
    seq = {name: tabular.sequence_logps(res.logits_pnv, tree) for name, res in fitted.items()}
    for name in ("ipo", "simpo"):
        assert fitted[name].grad_norm_i[-1] < 1e-5, name
        assert tabular.kl(star_ps, seq[name]) > 0.1, name
    assert tabular.kl(seq["ipo"], seq["simpo"]) > 0.5
    to_ref = {name: tabular.kl(lp, ref_ps) for name, lp in seq.items()}
    win = {name: tabular.win_rate(lp, ref_ps, rewards_ps) for name, lp in seq.items()}
    assert to_ref["ipo"] + 0.3 < to_ref["dpo"] < to_ref["simpo"] - 0.5
    assert win["ipo"] + 0.05 < win["dpo"] < win["simpo"] - 0.05


def test_chosen_implicit_rewards_decline_from_a_chosen_fitted_reference(mdp, pairs):
    """With pi_ref = SFT on the chosen responses, the mean chosen reward is -b KL(p_w || pi) <= 0:
    it starts at 0 and goes down under DPO, while the margin over rejected goes up."""
    tree = mdp.tree
    chosen_ps = tabular.chosen_logps(pairs, tree, mdp.num_prompts)
    sft_pnv = tabular.conditionals(chosen_ps, tree)
    res = tabular.fit(mdp, "dpo", pairs, hyper={"beta": BETA}, init_logits_pnv=sft_pnv,
                      ref_logits_pnv=sft_pnv, optimizer="adam", learning_rate=0.05, steps=150)
    chosen_i, rejected_i = res.chosen_reward_i, res.rejected_reward_i
    assert abs(chosen_i[0]) < 1e-6
    assert chosen_i[-1] < -0.1 and chosen_i[50] < chosen_i[5] < 0
    assert chosen_i[-1] - rejected_i[-1] > 0.5
    final_ps = tabular.sequence_logps(res.logits_pnv, tree)
    assert chosen_i[-1] == pytest.approx(-BETA * tabular.kl(chosen_ps, final_ps), abs=1e-2)


def test_sampled_pairs_match_the_expected_loss(mdp, pairs):
    sampled = tabular.sample_pairs(mdp, 20000, seed=1)
    # The chosen responses' frequencies estimate the exact chosen distribution.
    exact_ps = np.exp(tabular.chosen_logps(pairs, mdp.tree, mdp.num_prompts))
    sampled_ps = np.exp(tabular.chosen_logps(sampled, mdp.tree, mdp.num_prompts))
    assert np.abs(exact_ps - sampled_ps).max() < 0.02
    res = tabular.fit(mdp, "dpo", sampled, hyper={"beta": BETA}, steps=100)
    seq_ps = tabular.sequence_logps(res.logits_pnv, mdp.tree)
    assert tabular.kl(tabular.optimal_sequence_logps(mdp), seq_ps) < 0.02


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_flipped_pairs_make_rdpo_unbiased_and_pull_dpo_to_the_reference(mdp, pairs, rate):
    """rDPO on labels flipped at its rate has DPO's clean expected loss at any policy (its
    unbiasedness claim); DPO on the same noisy pairs has a different, flatter loss."""
    from prefopt_jax import losses

    noisy = tabular.flipped_pairs(pairs, rate)
    assert len(noisy.weight_k) == 2 * len(pairs.weight_k)
    assert float(noisy.weight_k.sum()) == pytest.approx(1.0)
    ref = mdp.ref_logits_pnv
    rng = np.random.default_rng(0)
    for _ in range(3):
        logits = ref + rng.normal(0.0, 1.0, ref.shape)
        clean = tabular.expected_loss(logits, losses.get("dpo"), pairs, mdp.tree, ref,
                                      {"beta": BETA})
        robust = tabular.expected_loss(logits, losses.get("robust"), noisy, mdp.tree, ref,
                                       {"beta": BETA, "label_smoothing": rate})
        plain = tabular.expected_loss(logits, losses.get("dpo"), noisy, mdp.tree, ref,
                                      {"beta": BETA})
        assert float(robust) == pytest.approx(float(clean), rel=1e-5)
        assert abs(float(plain) - float(clean)) > 1e-3
    with pytest.raises(ValueError, match="flip rate"):
        tabular.flipped_pairs(pairs, 1.5)


def test_beam_search(mdp, fitted):
    tree = mdp.tree
    for logits_pnv in (fitted["dpo"].logits_pnv, mdp.ref_logits_pnv):
        seq_ps = tabular.sequence_logps(logits_pnv, tree)
        for prompt in range(mdp.num_prompts):
            tokens_wh, logps_w = tabular.beam_search(logits_pnv, tree, tree.num_sequences, prompt)
            order_pj, top_logps_pj = tabular.top_k(seq_ps[prompt:prompt + 1], tree.num_sequences)
            np.testing.assert_array_equal(tokens_wh, tree.tokens_sh[order_pj[0]])
            np.testing.assert_allclose(logps_w, top_logps_pj[0], atol=1e-12)
            tokens_wh, logps_w = tabular.beam_search(logits_pnv, tree, 3, prompt)
            assert tokens_wh.shape == (3, tree.horizon) and np.all(np.diff(logps_w) <= 0)
            codes_w = tokens_wh @ (tree.vocab_size ** np.arange(tree.horizon - 1, -1, -1))
            np.testing.assert_allclose(seq_ps[prompt, codes_w], logps_w, atol=1e-12)
    # Width 1 is greedy decoding.
    logp_nv = mdp.ref_logps_pnv[0]
    node, greedy = 0, []
    for _ in range(tree.horizon):
        greedy.append(int(np.argmax(logp_nv[node])))
        node = tree.child_nv[node, greedy[-1]]
    np.testing.assert_array_equal(tabular.beam_search(mdp.ref_logits_pnv, tree, 1)[0][0], greedy)


@pytest.mark.parametrize("loss", ["hinge", "robust", "sigmoid_norm", "cpo", "tgdpo"])
def test_other_registered_losses_train(mdp, pairs, loss):
    """Any registered pairwise loss trains here; tgdpo gets frozen token rewards b log pi*/pi_ref
    gathered per pair through ``extra_inputs``."""
    extra = None
    if loss == "tgdpo":
        star_rewards_pnv = BETA * (tabular.solve(mdp).logps_pnv - mdp.ref_logps_pnv)
        reward_w_kh, reward_l_kh = tabular.pair_token_values(star_rewards_pnv, pairs, mdp.tree)
        extra = {"token_rewards_w_pc": reward_w_kh, "token_rewards_l_pc": reward_l_kh}
    res = tabular.fit(mdp, loss, pairs, extra_inputs=extra, optimizer="adam", steps=20)
    assert np.all(np.isfinite(res.loss_i)) and res.loss_i[-1] < res.loss_i[0]

"""Hand-computed values: tiny inputs whose sequence sums are worked out in the comments.

Pair (plus one filler pair of garbage that must give exactly 0):
  chosen   l = [-1, -2]   ref [-1.5, -2]  mask [1, 1]: L_w = -3, L_ref,w = -3.5, D_w = 0.5
  rejected l = [-3, -.5]  ref [-2, -1]    mask [1, 0]: L_l = -3, L_ref,l = -2,   D_l = -1
  h = 1.5; means: Lbar_w = -1.5, Lbar_l = -3, Dbar_w = 0.25, Dbar_l = -1, hbar = 1.25.
  gold [-0.5, -0.5] (NLLmean 0.5); other rewards 1.0 vs 0.2; win probs 0.8 vs 0.3;
  token rewards chosen [1, 0], rejected [2, 5 (masked)].
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import prefopt_jax.losses as losses
from losses_cases import LogitsDistill, distill_from_logits


def sp(x):
    return math.log1p(math.exp(x))


def s(x):
    return 1.0 / (1.0 + math.exp(-x))


def ls(x):
    return -sp(-x)


def pair_inputs(**fields):
    a = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    garbage = [-777.0, -1e4]
    base = dict(
        logps_w_pc=a([[-1, -2], garbage]), logps_l_pc=a([[-3, -0.5], garbage]),
        mask_w_pc=a([[1, 1], [1, 1]]), mask_l_pc=a([[1, 0], [1, 1]]),
        ref_logps_w_pc=a([[-1.5, -2], garbage]), ref_logps_l_pc=a([[-2, -1], garbage]),
        valid_p=a([1, 0]),
        token_rewards_w_pc=a([[1, 0], [9, 9]]), token_rewards_l_pc=a([[2, 5], [9, 9]]),
        extras={"gold_logps_pc": a([[-0.5, -0.5], garbage]), "gold_mask_pc": a([[1, 1], [1, 1]]),
                "other_rewards_w_pk": a([[1.0], [50]]), "other_rewards_l_pk": a([[0.2], [-50]]),
                "win_prob_w_p": a([0.8, 0.1]), "win_prob_l_p": a([0.3, 0.9])})
    base.update(fields)
    return losses.PairwiseInputs(**base)


LOR = 1.5 - (math.log(1 - math.exp(-1.5)) - math.log(1 - math.exp(-3)))
PAIRWISE = [
    ("dpo", {}, sp(-0.15)),
    ("dpo", {"label_smoothing": 0.1}, 0.9 * sp(-0.15) + 0.1 * sp(0.15)),
    ("robust", {}, (0.9 * sp(-0.15) - 0.1 * sp(0.15)) / 0.8),
    ("ipo", {}, (1.25 - 5.0) ** 2),
    ("hinge", {}, 1 - 0.15),
    ("slic", {}, 1.0 + 0.5 * 3.0),  # max(0, 1 + 3 - 3) + 0.5 * NLL_sum(y_w) = 3
    ("exo_pair", {},
     s(0.15) * (ls(0.15) - math.log(0.999)) + s(-0.15) * (ls(-0.15) - math.log(1e-3))),
    ("nca_pair", {}, sp(-0.05) + 0.5 * sp(0.05) + 0.5 * sp(-0.1)),
    ("bco_pair", {}, 2 * sp(-0.075)),  # m = mean(0.05, -0.1) = -0.025
    ("bco_pair", {"running_mean": False}, sp(-0.05) + sp(-0.1)),
    ("sppo_hard", {}, (0.5 - 5) ** 2 + (-1 + 5) ** 2),
    ("aot", {}, sp(-0.15)),  # one real pair: sorting is the identity
    ("aot_unpaired", {}, sp(-0.15)),
    ("apo_zero", {}, 1 - s(0.05) + s(-0.1)),
    ("apo_down", {}, s(0.05) + 1 - s(0.15)),
    ("discopop", {}, (1 - s(3.0)) * sp(-0.15) + s(3.0) * math.exp(-0.15)),
    ("sigmoid_norm", {}, sp(-0.125)),
    ("sft", {}, 1.5),
    ("simpo", {}, sp(-(2 * -1.5 - 2 * -3 - 0.5))),
    ("cpo", {}, math.log(2) + 1.5),
    ("orpo", {}, 1.5 + 0.1 * sp(-LOR)),
    ("tpo", {}, math.log(2) + 0.5),
    ("tpo_l", {}, sp(-(0.01 * 1.5 - 0.5)) + 0.5),
    ("rpo", {}, sp(-0.15) + 1.5),
    ("rpo", {"alpha": 0.005 * 0.1, "nll_reduction": "sum"}, sp(-0.15) + 0.0005 * 3),
    ("gamma_rank", {"gamma": 0.5}, sp(-0.1 * (0 + 0.5 * (-2 + 3.5)))),
    ("modpo", {}, sp(-(0.15 - 0.5 * 0.8) / 0.5)),
    ("vpo", {}, sp(-0.15) - 1.0 * 0.1 * 0.5),
    ("vpo", {"online": True}, sp(-0.15) + 1.0 * 0.1 * 0.5),
    ("dno", {}, s(0.5) * sp(-0.15) + s(-0.5) * sp(0.15)),
    ("sppo", {"beta": 0.1}, 0.5 * ((0.5 - 10 * 0.3) ** 2 + (-1 - 10 * -0.2) ** 2)),
    # chosen: 0.1(1 + 0.5)(0.5) + 0.1(1)(0) = 0.075; rejected: 0.1(1 - 0.5*2)(-1) = 0
    ("tgdpo", {}, sp(-0.075)),
    ("cpl", {}, sp(0.5 * -0.3 + 0.3)),  # S+ = 0.1 * -3, S- = 0.1 * -3
    ("cpl", {"gamma": 0.5}, sp(0.5 * -0.3 + 0.2)),  # S+ = 0.1 (-1 + 0.5 * -2)
    ("cpl_kl", {}, sp(0.75 * -0.2 - 0.1)),  # S+ = 0.2 * 0.5, S- = 0.2 * -1
    ("mpo", {}, 0.8 * sp(-0.15) + 0.2 * 2 * sp(-0.075) + 1.5),
]


@pytest.mark.parametrize("name,hyper,want", PAIRWISE,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(PAIRWISE)])
def test_pairwise_hand(name, hyper, want):
    out = losses.get(name)(pair_inputs(), **hyper)
    np.testing.assert_allclose(out.loss_p, [want, 0.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.mean_loss(out), want, rtol=1e-5)


def test_pairwise_metrics_hand():
    m = losses.metric_values(losses.get("dpo")(pair_inputs()).metrics)
    np.testing.assert_allclose([m["rewards/chosen"], m["rewards/rejected"], m["rewards/margin"]],
                               [0.05, -0.1, 0.15], rtol=1e-5)
    assert m["rewards/accuracy"] == 1.0
    np.testing.assert_allclose([m["logps/chosen"], m["ref_logps/chosen"], m["ref_logps/rejected"]],
                               [-3.0, -3.5, -2.0])


def test_bco_pair_state_hand():
    out = losses.get("bco_pair")(pair_inputs())
    np.testing.assert_allclose([out.state["mean"], out.state["count"]], [-0.025, 2.0], rtol=1e-5)
    # Second step: 2 old rewards at mean 1.0, 2 new ones summing to -0.05.
    out = losses.get("bco_pair")(pair_inputs(), {"mean": jnp.float32(1.0),
                                                 "count": jnp.float32(2.0)})
    np.testing.assert_allclose(out.state["mean"], (2.0 - 0.05) / 4, rtol=1e-5)


def test_aot_sorting_hand():
    """Two pairs, one token each.  u = L_w - L_l = (1, -2), v = L_ref,w - L_ref,l = (0, 3).

    aot: sorted u (-2, 1) minus sorted v (0, 3) = (-2, -2): both pairs softplus(0.2).
    aot_unpaired: D_w = (0, -2), D_l = (-1, 3): sorted (-2, 0) - (-1, 3) = (-1, -3), rank 0 is
    pair 2 (softplus(0.1)), rank 1 is pair 1 (softplus(0.3)).
    """
    a = lambda x: jnp.asarray(x, jnp.float32)[:, None]  # noqa: E731
    inputs = losses.PairwiseInputs(
        logps_w_pc=a([-1, -3]), logps_l_pc=a([-2, -1]), mask_w_pc=a([1, 1]),
        mask_l_pc=a([1, 1]), ref_logps_w_pc=a([-1, -1]), ref_logps_l_pc=a([-1, -4]))
    np.testing.assert_allclose(losses.get("aot")(inputs).loss_p, [sp(0.2), sp(0.2)], rtol=1e-5)
    np.testing.assert_allclose(losses.get("aot_unpaired")(inputs).loss_p, [sp(0.3), sp(0.1)],
                               rtol=1e-5)


def unpaired_inputs(kl_sign=1.0):
    """ex0 desirable D = 0.5, ex1 undesirable D = -1; mismatched D = kl_sign * (0.2, 0.6)."""
    a = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return losses.UnpairedInputs(
        logps_nc=a([[-1, -2], [-3, -0.5]]), ref_logps_nc=a([[-1.5, -2], [-2, -1]]),
        mask_nc=a([[1, 1], [1, 0]]), label_n=jnp.array([True, False]),
        kl_logps_nc=a([[-1, 0], [-2, 0]]),
        kl_ref_logps_nc=a([[-1 - 0.2 * kl_sign, 0], [-2 - 0.6 * kl_sign, 0]]),
        kl_mask_nc=a([[1, 0], [1, 0]]))


def test_kto_hand():
    out = losses.get("kto")(unpaired_inputs())  # z0 = 0.4
    np.testing.assert_allclose(out.loss_p, [1 - s(0.01), 1 - s(0.14)], rtol=1e-5)
    np.testing.assert_allclose(out.metrics["kto/z0"][0], 0.4, rtol=1e-5)
    out = losses.get("kto")(unpaired_inputs(kl_sign=-1.0))  # mean -0.4, clamped to z0 = 0
    np.testing.assert_allclose(out.loss_p, [1 - s(0.05), 1 - s(0.1)], rtol=1e-5)


def test_kto_requires_reference_point():
    with pytest.raises(ValueError, match="z0"):
        losses.get("kto")(unpaired_inputs().replace(kl_logps_nc=None))


def test_bco_hand():
    out = losses.get("bco")(unpaired_inputs())  # r = (0.05, -0.1), m = -0.025
    np.testing.assert_allclose(out.loss_p, [sp(-0.075), sp(-0.075)], rtol=1e-5)


def list_inputs():
    """One list: D = (1, 3, -2) so s = (0.1, 0.3, -0.2); label scores (2, 1, 3)."""
    a = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return losses.ListwiseInputs(
        logps_pkc=a([[[-2], [-1], [-3]]]), ref_logps_pkc=a([[[-3], [-4], [-1]]]),
        mask_pkc=a([[[1], [1], [1]]]), scores_pk=a([[2, 1, 3]]))


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_plackett_luce_hand():
    # ranking by label: item2 (-0.2), item0 (0.1), item1 (0.3)
    want = -((-0.2 - lse(-0.2, 0.1, 0.3)) + (0.1 - lse(0.1, 0.3)) + 0.0)
    np.testing.assert_allclose(losses.get("plackett_luce")(list_inputs()).loss_p, [want],
                               rtol=1e-5)


def test_lipo_lambda_hand():
    # current ranks by s: item1 1, item0 2, item2 3; gains G = 2^psi - 1 = (3, 1, 7)
    d0, d1, d2 = 1 / math.log(3), 1 / math.log(2), 1 / math.log(4)
    want = -(4 * abs(d2 - d0) * ls(-0.3)      # item2 > item0
             + 6 * abs(d2 - d1) * ls(-0.5)    # item2 > item1
             + 2 * abs(d0 - d1) * ls(-0.2))   # item0 > item1
    np.testing.assert_allclose(losses.get("lipo_lambda")(list_inputs()).loss_p, [want],
                               rtol=1e-5)


def test_bradley_terry_hand():
    a = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    inputs = losses.RewardPairInputs(reward_w_p=a([1.0]), reward_l_p=a([0.5]), margin_p=a([0.2]))
    out = losses.get("bradley_terry")(inputs, center_coef=0.01)
    np.testing.assert_allclose(out.loss_p, [sp(-0.3) + 0.01 * 1.5 ** 2], rtol=1e-5)


def test_aligndistil_hand():
    """Vocab 2, one token. Student p = (.5, .5); DPO p = (.75, .25); reference p = (.5, .5).

    w = 10 (0.25 + 0.25) + 1e-3 = 5.001; teacher logits (1 + w) (log 3, 0).
    """
    a = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    inputs = LogitsDistill(logits_ncv=a([[[0, 0]]]), dpo_logits_ncv=a([[[math.log(3), 0]]]),
                           ref_logits_ncv=a([[[0, 0]]]), mask_nc=a([[1]]))
    w = 5.001
    q0 = s(6.001 * math.log(3))
    kl = 0.5 * (math.log(0.5) - math.log(q0)) + 0.5 * (math.log(0.5) - math.log(1 - q0))
    out = distill_from_logits(inputs)
    np.testing.assert_allclose(out.loss_p, [0.1 / w * kl], rtol=1e-5)


def test_vpo_calibration_samples_hand():
    """Calibration sample log-ratio 1 - (-1) = 2 replaces D_w: offline sp(-0.15) - 0.1 * 2."""
    a = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    base = pair_inputs()
    inputs = base.replace(extras={**base.extras, "cal_logps_pc": a([[-1, -9], [0, 0]]),
                                  "cal_ref_logps_pc": a([[-3, -9], [0, 0]]),
                                  "cal_mask_pc": a([[1, 0], [0, 0]])})
    np.testing.assert_allclose(losses.get("vpo")(inputs).loss_p, [sp(-0.15) - 0.2, 0.0],
                               rtol=1e-5)


def rollout(rewards, logps, ref=None, values=None, mask=None):
    a = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
    logps = a(logps)
    return losses.RolloutInputs(logps_nc=logps, mask_nc=a(mask) if mask else jnp.ones_like(logps),
                                rewards_n=a(rewards), ref_logps_nc=a(ref), values_nc=a(values))


def test_ppo_hand():
    """One sequence, 2 tokens, V = (0.5, 0.2), r = 1, on-policy, no reference, gamma 1, lam .95.

    delta = (0 + 0.2 - 0.5, 1 + 0 - 0.2) = (-0.3, 0.8); A = (-0.3 + 0.95 * 0.8, 0.8) = (.46, .8);
    R = A + V = (.96, 1.0). Unwhitened: tokens -A + 0.1 * 0.5 A^2 (V = V_old so no value clip).
    Whitened: A -> (-1/sqrt2, 1/sqrt2) (unbiased std of two values), policy terms cancel.
    """
    inputs = rollout([1.0], [[-1.0, -2.0]], values=[[0.5, 0.2]])
    vf = 0.5 * (0.46 ** 2 + 0.8 ** 2)
    out = losses.get("ppo")(inputs, whiten=False)
    np.testing.assert_allclose(losses.mean_loss(out), (-0.46 - 0.8 + 0.1 * vf) / 2, rtol=1e-5)
    out = losses.get("ppo")(inputs)
    np.testing.assert_allclose(losses.mean_loss(out), 0.1 * vf / 2, rtol=1e-4, atol=1e-6)


def test_grpo_hand():
    """Group of 2, rewards (1, 0): mean .5, unbiased std 1/sqrt2, A = +-(.5 sqrt2)/(1 + 1e-4 sqrt2)
    roughly; on-policy ratio 1; one token with log pi - log pi_ref = 1: k3 = e^-1."""
    inputs = rollout([1.0, 0.0], [[-1.0], [-1.0]], ref=[[-2.0], [-2.0]])
    adv = 0.5 / (math.sqrt(0.5) + 1e-4)
    out = losses.get("grpo")(inputs, group_size=2)
    np.testing.assert_allclose(out.loss_p, [-adv + 0.04 / math.e, adv + 0.04 / math.e],
                               rtol=1e-5)
    out = losses.get("dr_grpo")(inputs, group_size=2)  # A = +-0.5, no std
    np.testing.assert_allclose(out.loss_p, [-0.5 + 0.04 / math.e, 0.5 + 0.04 / math.e],
                               rtol=1e-5)


def test_rloo_hand():
    """Group of 2, rewards (1, 0), no reference: A = (1, -1); loss -A L(y) with L = (-2, -3)."""
    inputs = rollout([1.0, 0.0], [[-1.0, -1.0], [-1.0, -2.0]])
    np.testing.assert_allclose(losses.get("rloo")(inputs, group_size=2).loss_p, [2.0, -3.0],
                               rtol=1e-6)

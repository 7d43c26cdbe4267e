"""Evaluation metrics on arrays : pure numpy functions.

Shape letters: `p` preference pairs, `q` sampled sequences, `c` completion positions.

Inputs are sequence log-probs `L(y) = sum_t log pi(y_t|s_t)` (masked sums) and rewards; optional
`mask_p` / `mask_q` arrays (1 = count the row) keep filler rows out of every mean.
"""

from __future__ import annotations

import numpy as np


def _mean(x, mask=None) -> float:
    """Mean of `x` over rows where `mask` is nonzero (all rows when None)."""
    x = np.asarray(x, np.float64)
    if mask is None:
        return float(x.mean())
    mask = np.asarray(mask, np.float64)
    return float((x * mask).sum() / max(mask.sum(), 1.0))


def reward_accuracy(rewards_w_p, rewards_l_p, mask_p=None) -> float:
    """Fraction of pairs with `r(y_w) > r(y_l)` (for DPO pass `b D_w`, `b D_l`)."""
    return _mean(np.asarray(rewards_w_p) > np.asarray(rewards_l_p), mask_p)


def implicit_reward_accuracy(logps_w_p, ref_logps_w_p, logps_l_p, ref_logps_l_p, beta=0.1,
                             mask_p=None) -> float:
    """Reward accuracy of the implicit reward: `1[b D_w > b D_l]`."""
    d_w = beta * (np.asarray(logps_w_p, np.float64) - ref_logps_w_p)
    d_l = beta * (np.asarray(logps_l_p, np.float64) - ref_logps_l_p)
    return reward_accuracy(d_w, d_l, mask_p)


def ranking_accuracy(logps_w_p, logps_l_p, lengths_w_p=None, lengths_l_p=None,
                     mask_p=None) -> float:
    """Fraction of pairs with `pi(y_w|x) >= pi(y_l|x)`; with lengths, length-normalised
    (`L(y_w)/|y_w| >= L(y_l)/|y_l|`)."""
    score_w = np.asarray(logps_w_p, np.float64)
    score_l = np.asarray(logps_l_p, np.float64)
    if (lengths_w_p is None) != (lengths_l_p is None):
        raise ValueError("ranking_accuracy needs both lengths_w_p and lengths_l_p, or neither")
    if lengths_w_p is not None:
        score_w = score_w / np.maximum(lengths_w_p, 1)
        score_l = score_l / np.maximum(lengths_l_p, 1)
    return _mean(score_w >= score_l, mask_p)


def idealised_log_ratio(ref_logps_w_p, ref_logps_l_p, alpha_p, beta):
    """`log pi*(y_w)/pi*(y_l) = log pi_ref(y_w)/pi_ref(y_l) + (1/b) log(alpha/(1-alpha))`.

    The ratio under perfect DPO/RLHF optimisation when a Bradley-Terry rater prefers `y_w` with
    probability `alpha` ("Preference Learning Algorithms Do Not Learn Preference Rankings").
    """
    alpha_p = np.asarray(alpha_p, np.float64)
    return (np.asarray(ref_logps_w_p, np.float64) - ref_logps_l_p
            + (np.log(alpha_p) - np.log1p(-alpha_p)) / beta)


def idealised_ranking_accuracy(ref_logps_w_p, ref_logps_l_p, alpha_p, beta, mask_p=None) -> float:
    """`R* = E 1[pi*(y_w)/pi*(y_l) > 1]`: the ranking accuracy a perfectly optimised model gets."""
    return _mean(idealised_log_ratio(ref_logps_w_p, ref_logps_l_p, alpha_p, beta) > 0, mask_p)


def flip_threshold(ref_logps_w_p, ref_logps_l_p, beta):
    """The DPO loss a pair must reach to be ranked correctly: `-log s(b c)`,
    `c = log pi_ref(y_l)/pi_ref(y_w)`; ranking is correct iff `L_dpo <= threshold`."""
    c_p = np.asarray(ref_logps_l_p, np.float64) - ref_logps_w_p
    return np.logaddexp(0.0, -beta * c_p)


def sampled_kl(logps_qc, ref_logps_qc, mask_qc, estimator: str = "k1") -> float:
    """`KL(pi || pi_ref)` per sequence from samples of `pi`: the mean over sequences of the summed
    per-token estimate (`k1 = d`, unbiased; `k3 = exp(-d) - 1 + d`, non-negative)."""
    d_qc = np.asarray(logps_qc, np.float64) - np.asarray(ref_logps_qc, np.float64)
    if estimator == "k1":
        est_qc = d_qc
    elif estimator == "k3":
        est_qc = np.expm1(-d_qc) + d_qc
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose 'k1' or 'k3'")
    return float((est_qc * np.asarray(mask_qc, np.float64)).sum(-1).mean())


def win_rate(rewards_q, ref_rewards_q, mask_q=None) -> float:
    """Fraction of prompts where the policy's reply beats the reference's under a ground-truth
    reward (ties count 1/2); rows are paired by prompt."""
    r, r_ref = np.asarray(rewards_q, np.float64), np.asarray(ref_rewards_q, np.float64)
    return _mean((r > r_ref) + 0.5 * (r == r_ref), mask_q)


def length_stats(lengths_q) -> dict[str, float]:
    """Mean, std, min, median and max of response lengths (in tokens)."""
    lengths_q = np.asarray(lengths_q, np.float64)
    return {"mean": float(lengths_q.mean()), "std": float(lengths_q.std()),
            "min": float(lengths_q.min()), "median": float(np.median(lengths_q)),
            "max": float(lengths_q.max())}

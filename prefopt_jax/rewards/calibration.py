"""Reward-model accuracy and calibration on held-out pairs: reliability bins and ECE.

Shape letters: `p` pairs, `n` predictions, `k` bins.

A Bradley-Terry model predicts `P(y_w beats y_l) = sigma(r_w - r_l)`. Every held-out pair has the
label "chosen wins", so the predictions are symmetrised: each pair counts once as
`(sigma(r_w - r_l), 1)` and once as `(sigma(r_l - r_w), 0)`. The reliability curve is then the
observed win frequency per confidence bin, and ECE the bin-size-weighted mean gap.
"""

from __future__ import annotations

import numpy as np


def reliability_bins(probs_n, labels_n, num_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins on [0, 1]: count, mean predicted probability and observed frequency.

    Empty bins have count 0 and nan means. The last bin includes 1.0.
    """
    probs_n = np.asarray(probs_n, np.float64)
    labels_n = np.asarray(labels_n, np.float64)
    bin_n = np.minimum((probs_n * num_bins).astype(int), num_bins - 1)
    count_k = np.bincount(bin_n, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf_k = np.bincount(bin_n, probs_n, minlength=num_bins) / count_k
        freq_k = np.bincount(bin_n, labels_n, minlength=num_bins) / count_k
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    return {"count": count_k, "confidence": conf_k, "frequency": freq_k, "edges": edges}


def expected_calibration_error(probs_n, labels_n, num_bins: int = 10) -> float:
    """ECE: `sum_k (n_k / n) |freq_k - conf_k|` over non-empty bins."""
    bins = reliability_bins(probs_n, labels_n, num_bins)
    real_k = bins["count"] > 0
    gap_k = np.abs(bins["frequency"][real_k] - bins["confidence"][real_k])
    return float(np.sum(bins["count"][real_k] * gap_k) / np.sum(bins["count"]))


def symmetric_predictions(r_w_p, r_l_p) -> tuple[np.ndarray, np.ndarray]:
    """`(probs_n, labels_n)`, n = 2p: pairs as (s(r_w - r_l), 1) and (s(r_l - r_w), 0)."""
    diff_p = np.asarray(r_w_p, np.float64) - np.asarray(r_l_p, np.float64)
    probs_p = 1.0 / (1.0 + np.exp(-diff_p))
    probs_n = np.concatenate([probs_p, 1.0 - probs_p])
    labels_n = np.concatenate([np.ones_like(probs_p), np.zeros_like(probs_p)])
    return probs_n, labels_n


def pair_report(r_w_p, r_l_p, num_bins: int = 10) -> dict:
    """Accuracy, ECE, mean margin and reliability bins of a reward model on pairs (JSON-able)."""
    probs_n, labels_n = symmetric_predictions(r_w_p, r_l_p)
    bins = reliability_bins(probs_n, labels_n, num_bins)
    clean = lambda x: [None if np.isnan(v) else float(v) for v in x]  # noqa: E731
    return {
        "pairs": int(np.size(r_w_p)),
        "accuracy": float(np.mean(np.asarray(r_w_p) > np.asarray(r_l_p))),
        "ece": expected_calibration_error(probs_n, labels_n, num_bins),
        "margin_mean": float(np.mean(np.asarray(r_w_p) - np.asarray(r_l_p))),
        "reliability": {k: clean(v) for k, v in bins.items()},
    }

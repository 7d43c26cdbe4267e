"""`prefopt_jax.evals.metrics` against hand-computed values."""

import numpy as np
import pytest

from prefopt_jax.evals import metrics


def test_reward_and_ranking_accuracy():
    assert metrics.reward_accuracy([1.0, 2.0, 0.0, 3.0], [0.0, 3.0, 0.0, 1.0]) == 0.5
    assert metrics.reward_accuracy([1.0, 2.0], [0.0, 3.0], mask_p=[1, 0]) == 1.0
    # b D_w = 0.1 * (-3 - -4) = 0.1 > b D_l = 0.1 * (-5 - -5) = 0; second pair reversed.
    assert metrics.implicit_reward_accuracy([-3.0, -6.0], [-4.0, -5.0], [-5.0, -2.0],
                                            [-5.0, -2.0]) == 0.5
    logps_w, logps_l = [-10.0, -4.0, -6.0], [-8.0, -4.0, -9.0]
    assert metrics.ranking_accuracy(logps_w, logps_l) == pytest.approx(2 / 3)
    # Per token: -10/5 = -2 >= -8/2 = -4; -4/4 = -1 < -4/8; -6/2 = -3 >= -9/3 = -3.
    assert metrics.ranking_accuracy(logps_w, logps_l, [5, 4, 2], [2, 8, 3]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="both"):
        metrics.ranking_accuracy(logps_w, logps_l, [5, 4, 2])


def test_idealised_ranking_accuracy_and_flip_threshold():
    # alpha = 0.75, b = 0.5: (1/b) log 3 = 2.197; pair 1: -3 + 2.197 < 0, pair 2: -1 + 2.197 > 0.
    ratio = metrics.idealised_log_ratio([-10.0, -5.0], [-7.0, -4.0], 0.75, 0.5)
    np.testing.assert_allclose(ratio, [-3 + 2 * np.log(3), -1 + 2 * np.log(3)])
    assert metrics.idealised_ranking_accuracy([-10.0, -5.0], [-7.0, -4.0], 0.75, 0.5) == 0.5
    # alpha = 0.5: only the reference's ranking counts.
    assert metrics.idealised_ranking_accuracy([-1.0, -5.0], [-2.0, -4.0], 0.5, 0.1) == 0.5
    # c = log pi_ref(y_l)/pi_ref(y_w) = 2, b = 0.5: threshold -log s(1).
    np.testing.assert_allclose(metrics.flip_threshold([-4.0], [-2.0], 0.5),
                               [np.log1p(np.exp(-1.0))])


def test_flip_threshold_agrees_with_the_ranking():
    rng = np.random.default_rng(0)
    lw, ll, rw, rl = rng.normal(size=(4, 200)) * 3
    beta = 0.3
    dpo_loss = np.logaddexp(0.0, -beta * ((lw - rw) - (ll - rl)))
    np.testing.assert_array_equal(dpo_loss <= metrics.flip_threshold(rw, rl, beta) + 1e-12,
                                  lw >= ll)


def test_sampled_kl_win_rate_and_lengths():
    logps = np.asarray([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref = np.asarray([[-2.0, -1.0, -9.0], [-1.5, -9.0, 0.0]])
    mask = np.asarray([[1, 1, 0], [1, 0, 0]])
    # k1: row sums (1 - 1) = 0 and 1 -> mean 0.5.
    assert metrics.sampled_kl(logps, ref, mask) == pytest.approx(0.5)
    k3 = ((np.exp(-1) - 1 + 1) + (np.exp(1) - 1 - 1) + (np.exp(-1) - 1 + 1)) / 2
    assert metrics.sampled_kl(logps, ref, mask, "k3") == pytest.approx(k3)
    with pytest.raises(ValueError, match="estimator"):
        metrics.sampled_kl(logps, ref, mask, "k9")
    assert metrics.win_rate([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0]) == pytest.approx(0.625)
    stats = metrics.length_stats([2, 4, 9])
    assert stats == {"mean": 5.0, "std": pytest.approx(np.std([2, 4, 9])), "min": 2.0,
                     "median": 4.0, "max": 9.0}

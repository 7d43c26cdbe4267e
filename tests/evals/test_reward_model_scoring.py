"""Calibration by hand, reward-model ensembles and PAR as search scorers."""

import numpy as np
import pytest

from prefopt_jax.rewards import calibration
from prefopt_jax.rewards import scorers as rm_scorers
from prefopt_jax.sampling.scorers import Candidates
from prefopt_jax.rewards import reward_model
from prefopt_jax.train import tiny
from prefopt_jax.models.spec import random_model


def test_reliability_bins_and_ece_by_hand():
    probs = np.array([0.05, 0.15, 0.12, 0.95, 0.91])
    labels = np.array([0, 1, 0, 1, 1])
    bins = calibration.reliability_bins(probs, labels, num_bins=10)
    np.testing.assert_array_equal(bins["count"], [1, 2, 0, 0, 0, 0, 0, 0, 0, 2])
    np.testing.assert_allclose(bins["confidence"][[0, 1, 9]], [0.05, 0.135, 0.93])
    np.testing.assert_allclose(bins["frequency"][[0, 1, 9]], [0.0, 0.5, 1.0])
    ece = (1 * 0.05 + 2 * abs(0.5 - 0.135) + 2 * 0.07) / 5
    assert calibration.expected_calibration_error(probs, labels, 10) == pytest.approx(ece)


def test_pair_report_symmetrises():
    r_w, r_l = np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])
    probs, labels = calibration.symmetric_predictions(r_w, r_l)
    s = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(probs, [s(1), 0.5, s(-1), s(-1), 0.5, s(1)])
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0, 0])
    report = calibration.pair_report(r_w, r_l, num_bins=2)
    assert report["accuracy"] == pytest.approx(1 / 3)
    # Bins [0, .5): s(-1) twice, labels 1 and 0; [.5, 1]: 0.5 twice and s(1) twice.
    gap_hi = abs((2 * 0.5 + 2 * s(1)) / 4 - 0.5)
    assert report["ece"] == pytest.approx((2 * abs(s(-1) - 0.5) + 4 * gap_hi) / 6)


@pytest.fixture(scope="module")
def members():
    return [reward_model.new_reward_model(random_model(tiny.config()), init_scale=1.0,
                                          seed=s) for s in range(3)]


def candidates(b=2, n=3, c=4, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, tiny.VOCAB, 3 + i)) for i in range(b)]
    mask = (np.arange(c)[None, None] < rng.integers(1, c + 1, (b, n))[..., None]).astype(np.int32)
    return Candidates(prompts, rng.integers(1, tiny.VOCAB, (b, n, c)), mask)


def test_ensembles_aggregate_member_scores(members):
    cands = candidates()
    each = np.stack([rm_scorers.reward_model_scorer(m)(cands) for m in members])
    assert each.shape == (3, 2, 3) and np.ptp(each) > 0
    np.testing.assert_allclose(rm_scorers.ensemble(members, "mean")(cands), each.mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rm_scorers.ensemble(members, "wco")(cands), each.min(0), atol=1e-6)
    uwo = rm_scorers.ensemble(members, "uwo", lam=0.1)(cands)
    np.testing.assert_allclose(uwo, each.mean(0) - 0.1 * each.var(0), rtol=1e-5, atol=1e-6)


def test_par_scorer_against_reference_replies(members):
    cands, refs = candidates(seed=1), candidates(n=4, seed=2)
    refs = refs._replace(prompts=cands.prompts)
    scorer = rm_scorers.reward_model_scorer(members[0])
    par = rm_scorers.PARScorer(scorer, ref_candidates=refs, k=2.0)(cands)
    r_bn, ref_bm = scorer(cands), scorer(refs)
    expect = (1 / (1 + np.exp(-2.0 * (r_bn[..., None] - ref_bm[:, None])))).mean(-1)
    np.testing.assert_allclose(par, expect, rtol=1e-5)
    assert np.all((par > 0) & (par < 1))


def test_par_samples_references_from_a_model(members):
    from prefopt_jax.sampling.generate import SamplingConfig

    scorer = rm_scorers.reward_model_scorer(members[1])
    par = rm_scorers.PARScorer(scorer, ref_model=members[0].trunk, num_ref=3,
                               config=SamplingConfig(max_new_tokens=3))(candidates())
    assert par.shape == (2, 3) and np.all(np.isfinite(par))

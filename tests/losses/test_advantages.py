"""Advantage estimators against a loop-by-loop numpy reference on hand-made groups: ties,
all-equal groups, single-sample groups, masked and abstaining (NaN) samples."""

import numpy as np
import pytest

from prefopt_jax.errors import ConfigError
from prefopt_jax.losses.advantages import ESTIMATORS, advantages, multi_objective

EPS = 1e-4


def reference(name, rewards, valid, k, **params):
    """Each row's advantage, computed group by group with Python loops."""
    rewards = np.asarray(rewards, np.float64)
    valid = np.asarray(valid, bool) & ~np.isnan(rewards)
    out = np.zeros(len(rewards))
    if name == "reinforce_pp":
        x = rewards.copy()
        if params.get("group_baseline"):
            for g in range(0, len(x), k):
                members = [i for i in range(g, g + k) if valid[i]]
                base = np.mean(rewards[members]) if members else 0.0
                for i in members:
                    x[i] = rewards[i] - base
        xs = x[valid]
        std = np.std(xs, ddof=1) if len(xs) > 1 else 0.0
        out[valid] = (xs - xs.mean()) / (std + EPS)
        return out
    for g in range(0, len(rewards), k):
        members = [i for i in range(g, g + k) if valid[i]]
        sample = [rewards[i] for i in members]
        if name == "ngrpo":
            sample = sample + [params.get("max_reward", 1.0)]
        mean = np.mean(sample) if sample else 0.0
        std = np.std(sample, ddof=1) if len(sample) > 1 else 0.0
        for i in members:
            if name in ("grpo", "ngrpo"):
                out[i] = (rewards[i] - mean) / (std + EPS)
            elif name == "dr_grpo":
                out[i] = rewards[i] - mean
            elif name == "rloo":
                others = [rewards[j] for j in members if j != i]
                out[i] = rewards[i] - np.mean(others) if others else 0.0
    return out


# Groups of 4: distinct rewards, a tie, all equal, one valid sample, all masked; then NaN.
REWARDS = [0.0, 1.0, 0.5, 2.0,  1.0, 1.0, 0.0, 0.0,  0.7, 0.7, 0.7, 0.7,
           3.0, 9.0, 9.0, 9.0,  5.0, 6.0, 7.0, 8.0,  1.0, np.nan, 0.0, 1.0]
VALID = [1, 1, 1, 1,  1, 1, 1, 1,  1, 1, 1, 1,  1, 0, 0, 0,  0, 0, 0, 0,  1, 1, 1, 1]
CASES = [("grpo", {}), ("dr_grpo", {}), ("rloo", {}), ("ngrpo", {}),
         ("ngrpo", {"max_reward": 3.0}), ("reinforce_pp", {}),
         ("reinforce_pp", {"group_baseline": True})]


def test_every_estimator_is_tested():
    assert {name for name, _ in CASES} == set(ESTIMATORS)


@pytest.mark.parametrize("name,params", CASES)
def test_estimator_equals_the_loop_reference(name, params):
    got = np.asarray(advantages(name, np.asarray(REWARDS, np.float32),
                                np.asarray(VALID, np.float32), 4, **params))
    want = reference(name, REWARDS, VALID, 4, **params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[np.asarray(VALID) == 0] == 0) and not np.isnan(got).any()
    if name != "ngrpo":  # all-equal and single-sample groups carry no signal
        assert np.all(got[8:16] == 0) or name == "reinforce_pp"


def test_all_agreeing_groups_get_zero_but_ngrpo_keeps_a_signal():
    equal = np.asarray([0.0, 0.0, 0.0, 0.0], np.float32)
    for name in ("grpo", "dr_grpo", "rloo"):
        assert np.all(np.asarray(advantages(name, equal, None, 4)) == 0)
    assert np.all(np.asarray(advantages("ngrpo", equal, None, 4)) < 0)  # all wrong: pushed down


def test_multi_objective_weights_each_columns_own_estimate():
    rng = np.random.default_rng(0)
    r_nm = rng.normal(size=(8, 2)).astype(np.float32)
    r_nm[3, 1] = np.nan  # the second function abstained on row 3
    got = np.asarray(multi_objective("grpo", r_nm, None, 4, weights=(0.7, 0.3)))
    want = (0.7 * reference("grpo", r_nm[:, 0], np.ones(8), 4)
            + 0.3 * reference("grpo", r_nm[:, 1], np.ones(8), 4))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_names_and_groups_are_config_errors():
    with pytest.raises(ConfigError, match="unknown advantage estimator 'grpoo'; known: dr_grpo"):
        advantages("grpoo", np.zeros(4, np.float32), None, 2)
    with pytest.raises(ConfigError, match="group_size 3 does not divide the 4 rollouts"):
        advantages("grpo", np.zeros(4, np.float32), None, 3)
    with pytest.raises(ConfigError, match="3 weights for 2 reward columns"):
        multi_objective("grpo", np.zeros((4, 2), np.float32), None, 2, weights=(1, 1, 1))

"""The iterative loop on the tiny model: previous-iterate reference, APO momentum, SPPO extras."""

import jax
import numpy as np
import pytest

from prefopt_jax.evals.rm_scorers import mean_token_scorer
from prefopt_jax.train import build, iterative, loop, optim, tiny
from prefopt_jax.train.reference import ReferenceConfig
from prefopt_jax.train.state import policy_params

PROMPTS = [p for p, _, _ in tiny.pairs(4, 0)]


def test_nesterov_by_hand():
    new = {"a": np.array([1.0, 2.0]), "b": {"c": np.array(3.0)}}
    prev = {"a": np.array([0.0, 4.0]), "b": {"c": np.array(1.0)}}
    out = iterative.nesterov(new, prev, 0.3)
    np.testing.assert_allclose(out["a"], [1.3, 1.4])
    np.testing.assert_allclose(out["b"]["c"], 3.6)


def run_loop(loss, hyper, momentum=0.0, win_probs=False):
    snapshots = []

    def callback(t, setup, state):
        host = lambda x: jax.tree.map(np.array, jax.device_get(x))  # noqa: E731
        snapshots.append((host(state.ref), host(policy_params(setup, state)),
                          host(state.params)))

    algo = build.AlgoConfig(loss=loss, hyper=hyper,
                            reference=ReferenceConfig(kind="previous"))
    config = iterative.IterativeConfig(iterations=2, steps_per_iteration=2, samples_per_prompt=3,
                                       batch_size=4, max_new_tokens=5, momentum=momentum,
                                       win_probs=win_probs)
    opt = optim.OptimConfig(learning_rate=1e-3, total_steps=4)
    _, _, history = iterative.run(loop.tiny_model(tiny.config()), PROMPTS, mean_token_scorer,
                                  algo, opt, config, callback=callback)
    return snapshots, history


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_two_iterations_move_the_reference_to_the_previous_iterate():
    (snapshots, history) = run_loop("dpo", {"beta": 0.1})
    assert [h["iteration"] for h in history] == [0, 1]
    assert all(np.isfinite(h["loss"]) and h["pairs"] >= 1 for h in history)
    (_, policy_0, _), (ref_1, policy_1, _) = snapshots
    assert_trees_equal(ref_1, policy_0)  # iteration 1 trains against iteration 0's policy
    with pytest.raises(AssertionError):
        assert_trees_equal(ref_1, policy_1)


def test_apo_momentum_and_sppo_win_probs():
    snapshots, history = run_loop("sppo", {"beta": 0.1}, momentum=0.3, win_probs=True)
    assert all(np.isfinite(h["loss"]) for h in history)
    # The reference of round 1 is the extrapolated policy of round 0, not the raw iterate.
    (_, policy_0, _), (ref_1, _, _) = snapshots
    assert_trees_equal(ref_1, policy_0)

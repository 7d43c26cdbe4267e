"""The iterative loop on the tiny model: previous-iterate reference, APO momentum, SPPO extras."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from prefopt_jax.evals.rm_scorers import mean_token_scorer
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.train import build, iterative, loop, optim, tiny
from prefopt_jax.train.reference import ReferenceConfig
from prefopt_jax.train.state import policy_params, to_f32

PROMPTS = [p for p, _, _ in tiny.pairs(4, 0)]


def test_nesterov_by_hand():
    new = {"a": np.array([1.0, 2.0]), "b": {"c": np.array(3.0)}}
    prev = {"a": np.array([0.0, 4.0]), "b": {"c": np.array(1.0)}}
    out = iterative.nesterov(new, prev, 0.3)
    np.testing.assert_allclose(out["a"], [1.3, 1.4])
    np.testing.assert_allclose(out["b"]["c"], 3.6)


def host(tree):
    return jax.tree.map(np.array, jax.device_get(tree))


def run_loop(loss, hyper, momentum=0.0, win_probs=False, lora=None, ref_kind="previous",
             **config_kwargs):
    snapshots = []

    def callback(t, setup, state):
        snapshots.append((host(state.ref), host(policy_params(setup, state)), host(state.params),
                          host(state.opt_state), host(state.base)))

    algo = build.AlgoConfig(loss=loss, hyper=hyper, reference=ReferenceConfig(kind=ref_kind))
    config = iterative.IterativeConfig(iterations=2, steps_per_iteration=2, samples_per_prompt=3,
                                       batch_size=4, max_new_tokens=5, momentum=momentum,
                                       win_probs=win_probs, **config_kwargs)
    opt = optim.OptimConfig(learning_rate=1e-3, total_steps=4)
    _, _, history = iterative.run(loop.tiny_model(tiny.config()), PROMPTS, mean_token_scorer,
                                  algo, opt, config, lora=lora, callback=callback)
    return snapshots, history


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_two_iterations_move_the_reference_to_the_previous_iterate():
    (snapshots, history) = run_loop("dpo", {"beta": 0.1})
    assert [h["iteration"] for h in history] == [0, 1]
    assert all(np.isfinite(h["loss"]) and h["pairs"] >= 1 for h in history)
    (_, policy_0, *_), (ref_1, policy_1, *_) = snapshots
    assert_trees_equal(ref_1, policy_0)  # iteration 1 trains against iteration 0's policy
    with pytest.raises(AssertionError):
        assert_trees_equal(ref_1, policy_1)


def test_apo_momentum_and_sppo_win_probs():
    snapshots, history = run_loop("sppo", {"beta": 0.1}, momentum=0.3, win_probs=True)
    assert all(np.isfinite(h["loss"]) for h in history)
    # The reference of round 1 is the extrapolated policy of round 0, not the raw iterate.
    (_, policy_0, *_), (ref_1, *_) = snapshots
    assert_trees_equal(ref_1, policy_0)


def counts(opt_state):
    return sorted({int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")})


@pytest.mark.parametrize("reset", [True, False])
def test_each_round_starts_a_fresh_optimizer_unless_carried_over(reset):
    snapshots, _ = run_loop("dpo", {"beta": 0.1}, reset_optimizer=reset)
    (*_, opt_0, _), (*_, opt_1, _) = snapshots
    # Adam's and the schedule's step counters: 2 steps per round, restarted or continued.
    assert counts(opt_0) == [2] and counts(opt_1) == ([2] if reset else [4])


def test_next_round_replaces_or_keeps_the_optimizer_state():
    algo = build.AlgoConfig(loss="dpo", hyper={"beta": 0.1},
                            reference=ReferenceConfig(kind="previous"))
    opt = optim.OptimConfig(learning_rate=1e-3, total_steps=4)
    config = iterative.IterativeConfig(iterations=1, steps_per_iteration=2, samples_per_prompt=3,
                                       batch_size=4, max_new_tokens=5)
    setup, state, _ = iterative.run(loop.tiny_model(tiny.config()), PROMPTS, mean_token_scorer,
                                    algo, opt, config)
    mesh = sharding_lib.make_mesh((1, 1, 1))
    ended = host(state.opt_state)
    assert counts(ended) == [2]
    carried = iterative.next_round(setup, state, dataclasses.replace(config, reset_optimizer=False), mesh)
    assert_trees_equal(host(carried.opt_state), ended)
    fresh = iterative.next_round(setup, state, config, mesh)
    assert_trees_equal(host(fresh.opt_state), host(setup.tx.init(to_f32(state.params))))
    assert_trees_equal(host(fresh.ref), host(policy_params(setup, state)))


LORA = lora_lib.LoraConfig(rank=2, alpha=4.0)


def test_apo_under_lora_extrapolates_the_merged_weights_exactly():
    snapshots, history = run_loop("dpo", {"beta": 0.1}, momentum=0.3, lora=LORA,
                                  reset_optimizer=False)
    assert all(np.isfinite(h["loss"]) for h in history)
    base_init = nnx.split(loop.tiny_model(tiny.config()), nnx.Param, ...)[1]
    merged = lambda base, adapters: host(lora_lib.apply_lora(base, adapters, LORA.scale))  # noqa
    (_, policy_0, adapters_0, _, base_0), (_, policy_1, adapters_1, _, _) = snapshots
    # thetahat_0 is the initial model (B = 0); the adapters stop where training left them.
    hat_0, hat_1 = merged(base_init, adapters_0), merged(base_0, adapters_1)
    close = lambda a, b: jax.tree.map(  # noqa: E731
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    close(policy_0, host(iterative.nesterov(hat_0, host(base_init), 0.3)))
    close(policy_1, host(iterative.nesterov(hat_1, hat_0, 0.3)))
    # Extrapolating A and B one by one lands elsewhere: (B + a dB)(A + a dA) != BA + a d(BA).
    init_adapters = lora_lib.init_adapters(base_init, LORA, jax.random.key(1))
    naive = merged(base_init, iterative.nesterov(adapters_0, host(init_adapters), 0.3))
    with pytest.raises(AssertionError):
        close(naive, policy_0)


def test_apo_under_lora_refuses_the_base_as_reference():
    with pytest.raises(ValueError, match="moves the base"):
        run_loop("dpo", {"beta": 0.1}, momentum=0.3, lora=LORA, ref_kind="lora",
                 reference="initial")

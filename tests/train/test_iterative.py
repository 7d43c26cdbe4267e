"""The iterative loop on the tiny model: previous-iterate reference, APO momentum, SPPO's win
probabilities, the optimiser across rounds; each run goes through the shared driver."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models.spec import ModelSpec, random_model
from prefopt_jax.online import iterative
from prefopt_jax.rewards.scorers import mean_token_scorer
from prefopt_jax.train import build, loop, optim, tiny
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


def run_loop(out_dir, loss, hyper, momentum=0.0, win_probs=False, lora=None,
             ref_kind="previous", rounds=2, **config_kwargs):
    """Rounds of 2 steps; (per-round snapshots, iterations.jsonl records, the last task)."""
    snapshots, tasks = [], []

    def callback(t, setup, state):
        snapshots.append((host(state.ref), host(policy_params(setup, state)), host(state.params),
                          host(state.opt_state), host(state.base)))

    algo = build.AlgoConfig(loss=loss, hyper=hyper, reference=ReferenceConfig(kind=ref_kind))
    config = iterative.IterativeConfig(steps_per_iteration=2, samples_per_prompt=3,
                                       batch_size=4, max_new_tokens=5, momentum=momentum,
                                       win_probs=win_probs, **config_kwargs)
    opt = optim.OptimConfig(learning_rate=1e-3, total_steps=4)
    spec = loop.LoopConfig(steps=2 * rounds, output_dir=str(out_dir), checkpoint_every=0,
                           export=False)

    def task(*args):
        tasks.append(iterative.IterativeTask(*args, iterative=config, scorer=mean_token_scorer,
                                             prompts=PROMPTS, callback=callback))
        return tasks[-1]

    loop.train(ModelSpec(lora=lora), loop.DataSpec(layout="padded"), algo, opt, spec, task)
    with open(out_dir / "iterations.jsonl") as f:
        history = [json.loads(line) for line in f]
    return snapshots, history, tasks[-1]


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """Two rounds of DPO with the default config (previous-iterate reference, optimiser reset
    each round): one run shared by the tests that read it."""
    return run_loop(tmp_path_factory.mktemp("dpo"), "dpo", {"beta": 0.1})


def test_two_iterations_move_the_reference_to_the_previous_iterate(dpo_run):
    snapshots, history, _ = dpo_run
    assert [h["round"] for h in history] == [0, 1]
    assert [h["step"] for h in history] == [2, 4]
    assert all(np.isfinite(h["loss"]) and h["pairs"] >= 1 for h in history)
    (_, policy_0, *_), (ref_1, policy_1, *_) = snapshots
    assert_trees_equal(ref_1, policy_0)  # iteration 1 trains against iteration 0's policy
    with pytest.raises(AssertionError):
        assert_trees_equal(ref_1, policy_1)


def test_apo_momentum_and_sppo_win_probs(tmp_path):
    snapshots, history, _ = run_loop(tmp_path, "sppo", {"beta": 0.1}, momentum=0.3,
                                     win_probs=True)
    assert all(np.isfinite(h["loss"]) for h in history)
    # The reference of round 1 is the extrapolated policy of round 0, not the raw iterate.
    (_, policy_0, *_), (ref_1, *_) = snapshots
    assert_trees_equal(ref_1, policy_0)


def counts(opt_state):
    return sorted({int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")})


@pytest.mark.parametrize("reset", [True, False])
def test_each_round_starts_a_fresh_optimizer_unless_carried_over(reset, tmp_path, dpo_run):
    # reset_optimizer=True is IterativeConfig's default: the shared run is that run.
    assert iterative.IterativeConfig().reset_optimizer
    snapshots, _, _ = dpo_run if reset else run_loop(tmp_path, "dpo", {"beta": 0.1},
                                                     reset_optimizer=False)
    (*_, opt_0, _), (*_, opt_1, _) = snapshots
    # Adam's and the schedule's step counters: 2 steps per round, restarted or continued.
    assert counts(opt_0) == [2] and counts(opt_1) == ([2] if reset else [4])


def test_next_round_replaces_or_keeps_the_optimizer_state(dpo_run):
    _, _, task = dpo_run  # its state at the end of round 1 (the optimiser reset at its start)
    setup, state, config = task.setup, task.state, task.config
    ended = host(state.opt_state)
    assert counts(ended) == [2]
    with jax.set_mesh(task.mesh):
        carried = iterative.next_round(setup, state,
                                       dataclasses.replace(config, reset_optimizer=False))
        fresh = iterative.next_round(setup, state, config)
    assert_trees_equal(host(carried.opt_state), ended)
    assert_trees_equal(host(fresh.opt_state), host(setup.tx.init(to_f32(state.params))))
    assert_trees_equal(host(fresh.ref), host(policy_params(setup, state)))


LORA = lora_lib.LoraConfig(rank=2, alpha=4.0)


def test_apo_under_lora_extrapolates_the_merged_weights_exactly(tmp_path):
    snapshots, history, _ = run_loop(tmp_path, "dpo", {"beta": 0.1}, momentum=0.3, lora=LORA,
                                     reset_optimizer=False)
    assert all(np.isfinite(h["loss"]) for h in history)
    base_init = nnx.split(random_model(tiny.config()), nnx.Param, ...)[1]
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


def test_apo_under_lora_refuses_the_base_as_reference(tmp_path):
    with pytest.raises(ValueError, match="moves the base"):
        run_loop(tmp_path, "dpo", {"beta": 0.1}, momentum=0.3, lora=LORA, ref_kind="lora",
                 reference="initial")


def test_sppo_without_win_probabilities_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs win probabilities: set IterativeConfig.win_probs"):
        run_loop(tmp_path, "sppo", {"beta": 0.1})

"""The online RL loop (`prefopt_jax.online.rl`) on the tiny random model.

Runs go through `prefopt train configs/experiments/grpo_tiny.gin` (or the Python API where a
test needs a Python reward): sampled groups train the policy, the update sees the sampler's
log-probs, losses are normalised over the whole batch under accumulation, DAPO's dynamic
sampling and overlong shaping do what they say, and bad input is named.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax import cli, losses
from prefopt_jax.data import DataError
from prefopt_jax.online import rl
from prefopt_jax.rewards.functions import RewardFunctionError, RewardFunctions
from prefopt_jax.train import build, driver, loop, optim
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.reference import ReferenceConfig
from prefopt_jax.train.state import policy_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = loop.ModelSpec(overrides=(("num_layers", 1),))
EVEN = ("share", {"pattern": "[0-9]*[02468]"})


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PREFOPT_DEBUG", "1")


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(out, *bindings):
    argv = ["train", "configs/experiments/grpo_tiny.gin", f"--gin.LoopConfig.output_dir='{out}'",
            *(f"--gin.{b}" for b in bindings)]
    assert cli.main(argv) == 0
    return records(out)


def task(tmp_path, loss="grpo", layout="prefix", micro=1, row_length=None, hyper=(),
         optimiser=optim.OptimConfig(warmup_steps=0), reference=ReferenceConfig(), **rl_kw):
    config = rl.RLConfig(**{"prompts_per_iteration": 4, "group_size": 4, "max_new_tokens": 8,
                            "rewards": (EVEN,), **rl_kw})
    data_spec = loop.DataSpec(layout=layout, micro_batches=micro, row_length=row_length)
    algo = build.AlgoConfig(loss=loss, hyper=hyper, reference=reference)
    return rl.RolloutTask(TINY, data_spec, algo, optimiser,
                          loop.LoopConfig(output_dir=str(tmp_path), seed=3), rl=config)


def test_grpo_raises_the_reward_it_is_given(tmp_path):
    """The share of even token ids, ~0.5 for the random policy, climbs within 30 iterations
    (8 prompts x 4 samples each, one step per iteration)."""
    out = run_cli(tmp_path, "LoopConfig.steps=30", "LoopConfig.checkpoint_every=0",
                  "LoopConfig.export=False", "RLConfig.epochs=1", "RLConfig.minibatches=1",
                  "RLConfig.prompts_per_iteration=8")
    reward = [r["reward/mean"] for r in out]
    assert [r["iteration"] for r in out] == list(range(30))
    assert np.mean(reward[-3:]) > np.mean(reward[:3]) + 0.25, reward
    assert all(np.isfinite(r["loss"]) and 0 <= r["clip_frac"] <= 1 for r in out)
    assert {"kl", "entropy", "completion/length_mean", "completion/truncated",
            "generation/tokens_per_s", "update_tokens_per_s", "accuracy/share"} - set(out[0]) \
        == {"accuracy/share"}  # a share is not a 0/1 check


def test_update_reads_the_samplers_logprobs_and_the_groups_rewards(tmp_path):
    """The behaviour log-probs put in the batch equal the policy's own log-probs of the batch
    (what the importance ratio compares at the first step), and each group is one example."""
    t = task(tmp_path)
    batch_m = driver.next_batch_m(t.loader, 1, t.fillers)
    batch = jax.tree.map(lambda x: x[0], batch_m)
    logps = step_lib.forward_logps(t.setup, policy_params(t.setup, t.state), t.state.rest, batch)
    mask = batch["completion_mask"] > 0
    np.testing.assert_allclose(np.asarray(logps)[mask], batch["old_logps"][mask], atol=2e-5)
    assert batch["rewards"].shape == (4, 4) and batch["completion_mask"].shape[0] == 16
    data = t.rollouts.data
    assert data.num_completions == 4 and len(data) == 4
    i = t.index_of[int(batch["example_index"][0])]
    np.testing.assert_array_equal(batch["rewards"][0], data.fields["rewards"][i])
    assert batch["tokens"].shape[0] == 4  # prefix layout: one row per group


def test_advantages_per_reward_function_are_weighted_after_normalising(tmp_path):
    """`RLConfig.advantage_per_reward`: the share of even ids (in [0, 1]) and the mean token id
    (tens) are each normalised within the group, then weighted (1 and 0.01): the second's scale
    no longer swamps the first, as it does in the advantages of the weighted sum."""
    from prefopt_jax.losses.rl import _estimate

    t = task(tmp_path, rewards=(EVEN, "scorer:mean_token"), reward_weights=(1.0, 0.01),
             advantage_per_reward=True)
    batch = jax.tree.map(lambda x: x[0], driver.next_batch_m(t.loader, 1, t.fillers))
    inputs = step_lib.objective_inputs(t.setup, step_lib.zero_scores(t.setup, batch), batch)
    got = np.asarray(_estimate(inputs, "grpo", inputs.rewards_n, 4, std_eps=1e-4))
    columns = batch["reward_columns"].reshape(-1, 4, 2)
    norm = (columns - columns.mean(1, keepdims=True)) / (columns.std(1, ddof=1, keepdims=True)
                                                        + 1e-4)
    np.testing.assert_allclose(got, (norm @ np.array([1.0, 0.01])).reshape(-1), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(inputs.rewards_n, (columns @ np.array([1.0, 0.01])).reshape(-1),
                               rtol=1e-5)
    plain = np.asarray(losses.advantages.advantages("grpo", inputs.rewards_n, None, 4))
    assert not np.allclose(plain, got, atol=1e-2)


def test_micro_batches_give_the_whole_batch_loss_and_gradient(tmp_path):
    """DAPO averages over every token of the batch (not of each micro-batch): split into two
    micro-batches, the loss and the gradient are those of the whole batch."""
    whole, split = task(tmp_path / "a", "dapo"), task(tmp_path / "b", "dapo", micro=2)
    np.testing.assert_array_equal(whole.rollouts.old_logps_nkc, split.rollouts.old_logps_nkc)
    one, _ = whole.step(1)
    two, _ = split.step(1)
    for key in ("loss", "grad_norm", "kl"):
        np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=1e-7)


def test_groups_cut_into_packed_runs_give_the_prefix_rows_loss_and_gradient(tmp_path):
    """`prefix_packed` rollouts: rows of the longest prompt and two full samples, so each
    group of 4 is cut into runs with their own prompt copies, packed together; the loss and
    the gradient are those of a row per group."""
    whole = task(tmp_path / "a", "dapo")
    longest = max(len(p) for p in whole.prompts.ids)
    split = task(tmp_path / "b", "dapo", layout="prefix_packed", row_length=longest + 16)
    assert split.layout.split_examples and split.layout.row_length == longest + 16
    batch = jax.tree.map(lambda x: x[0], driver.next_batch_m(split.loader, 1, split.fillers))
    segments = sum(len(set(row[row > 0])) for row in batch["segment_ids"])
    assert segments > 4 and batch["tokens"].shape[1] == longest + 16  # groups were cut
    split.loader = split.iteration_loader(0)  # the batch above again, for the step
    same_step(whole, split)


def test_packed_samples_give_the_prefix_rows_loss_and_gradient(tmp_path):
    """`packed` rollouts: a sample (its prompt and completion) per segment, several to a row;
    the row count is rounded up to a sixteenth of the 16 rows full-length samples would need
    (so no row is padding alone), so the update compiles at most 16 shapes."""
    whole, packed = task(tmp_path / "a", "dapo"), task(tmp_path / "b", "dapo", layout="packed")
    assert packed.layout.row_multiple == 1
    batch = jax.tree.map(lambda x: x[0], driver.next_batch_m(packed.loader, 1, packed.fillers))
    segments = sum(len(set(row[row > 0])) for row in batch["segment_ids"])
    assert segments == 16 and (batch["segment_ids"].max(axis=1) > 0).all()
    packed.loader = packed.iteration_loader(0)
    same_step(whole, packed)


def test_packed_row_counts_are_rounded_to_a_sixteenth_of_the_most_needed():
    """32 groups of 4 samples of at most 8 tokens: packed rows hold one full-length sample, so
    a batch needs at most 128 rows, counted in eights; prefix_packed rows hold a group, at most
    32, counted in twos (and in the data-parallel device count where that is larger)."""
    prompts = rl.Prompts([[1, 2, 3]] * 32, ["p"] * 32, {})
    config = rl.RLConfig(prompts_per_iteration=32, group_size=4, max_new_tokens=8)
    layout = lambda kind, devices=1: rl.rollout_layout(  # noqa: E731
        loop.DataSpec(layout=kind), prompts, config, devices, 0)
    assert layout("packed").row_multiple == 8
    assert layout("prefix_packed").row_multiple == 2
    assert layout("prefix_packed", devices=4).row_multiple == 4


def same_step(whole, other):
    """The two tasks drew the same rollouts and take the same first step."""
    np.testing.assert_array_equal(whole.rollouts.old_logps_nkc, other.rollouts.old_logps_nkc)
    one, _ = whole.step(1)
    two, _ = other.step(1)
    for key in ("loss", "grad_norm", "kl"):
        np.testing.assert_allclose(two[key], one[key], rtol=2e-5, atol=1e-7)


def test_an_entropy_bonus_adds_the_gradient_of_the_entropy(tmp_path):
    """DAPO averages over the batch's tokens, so `entropy_coef` c adds `-c mean_t H_t`. One
    SGD step (learning rate 1, no momentum, no clipping) with c moves the policy by c times
    the gradient of that mean entropy, computed here from the model's whole logits, beyond
    the step without a bonus. Without one the entropy is reported but not differentiated."""
    sgd = optim.OptimConfig(name="sgd", learning_rate=1.0, schedule="constant", warmup_steps=0,
                            b1=0.0, max_grad_norm=0.0)
    coef = 0.5
    plain = task(tmp_path / "a", "dapo", optimiser=sgd)
    bonus = task(tmp_path / "b", "dapo", hyper={"entropy_coef": coef}, optimiser=sgd)
    assert plain.setup.objective.setting("entropy_coef") == 0.0
    batch = jax.tree.map(lambda x: x[0], driver.next_batch_m(plain.loader, 1, plain.fillers))
    plain.loader = plain.iteration_loader(0)  # the batch above again, for the step
    params = policy_params(plain.setup, plain.state)
    mask = batch["completion_mask"]

    def mean_entropy(p):
        model = nnx.merge(plain.setup.graphdef, p, plain.state.rest)
        logits = model(batch["tokens"], batch["positions"], batch["segment_ids"],
                       batch["branch_ids"])
        logits_qcv = logits.reshape(-1, logits.shape[-1])[batch["source_index"]]
        logp_qcv = jax.nn.log_softmax(logits_qcv.astype(jnp.float32), axis=-1)
        entropy_qc = -jnp.sum(jnp.exp(logp_qcv) * logp_qcv, axis=-1)
        return jnp.sum(entropy_qc * mask) / jnp.sum(mask)

    entropy, grad = jax.value_and_grad(mean_entropy)(params)
    for t, differentiated in ((plain, False), (bonus, True)):
        engine = jax.grad(lambda p, t=t: jnp.sum(
            step_lib.score(t.setup, p, t.state, batch)["entropy"] * mask))(params)
        assert any(np.any(g != 0) for g in jax.tree.leaves(engine)) == differentiated
    one, _ = plain.step(1)
    two, _ = bonus.step(1)
    np.testing.assert_allclose(one["entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(two["loss"], one["loss"] - coef * entropy, rtol=1e-4, atol=1e-6)
    moved = jax.tree.map(lambda b, a: b - a, policy_params(bonus.setup, bonus.state),
                         policy_params(plain.setup, plain.state))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad))
    for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(grad)):
        np.testing.assert_allclose(got, coef * want, atol=5e-4 * coef * scale)
    assert scale > 0


def test_a_kl_coefficient_of_0_builds_no_reference(tmp_path):
    """GRPO at beta 0 (TRL's default) reads no reference: the 'auto' reference is none, so no
    reference model is kept and no reference pass runs, and a step equals the step of a run
    that keeps a frozen reference at beta 0. At beta 0.04 'auto' keeps one."""
    none = task(tmp_path / "a", hyper={"beta": 0.0})
    frozen = task(tmp_path / "b", hyper={"beta": 0.0}, reference=ReferenceConfig(kind="frozen"))
    assert none.setup.reference.kind == "none" and not none.setup.reference.has_params
    assert frozen.setup.reference.kind == "frozen" and frozen.setup.reference.has_params
    assert task(tmp_path / "c").setup.reference.kind == "frozen"
    np.testing.assert_array_equal(none.rollouts.old_logps_nkc, frozen.rollouts.old_logps_nkc)
    one, _ = none.step(1)
    two, _ = frozen.step(1)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(one[key], two[key], rtol=1e-5, atol=1e-8)
    assert one["grad_norm"] > 0
    for a, b in zip(jax.tree.leaves(policy_params(none.setup, none.state)),
                    jax.tree.leaves(policy_params(frozen.setup, frozen.state))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_dynamic_sampling_drops_groups_whose_rewards_agree(tmp_path):
    """A reward on the first token's parity: with G = 2 about half the groups agree. Those
    are dropped and more prompts sampled; the groups kept all disagree."""
    def first_even(prompts, completions, **_):
        return [float(int(c.split()[0]) % 2 == 0) for c in completions]

    t = task(tmp_path, "dapo", group_size=2, rewards=(first_even,), dynamic_sampling=True,
             max_sampling_rounds=8)
    metrics, rewards = t.rollouts.metrics, t.rollouts.data.fields["rewards"]
    assert 0 < metrics["groups/dropped_fraction"] < 1 and metrics["sampling_rounds"] > 1
    assert metrics["groups/filled_with_dropped"] == 0
    assert np.all(rewards[:, 0] != rewards[:, 1])
    assert t.cursor == 4 * metrics["sampling_rounds"]


def test_overlong_samples_are_filtered_and_shaped(tmp_path):
    """No stop token can end a tiny sample early: every sample is overlong, so the filter
    leaves nothing to train on; the soft penalty is DAPO's ramp."""
    np.testing.assert_allclose(rl.overlong_shaping(np.array([4, 6, 7, 8]), 8, 4, 2.0),
                               [0.0, -1.0, -1.5, -2.0])
    t = task(tmp_path, overlong_filter=True)
    assert t.rollouts.metrics["completion/truncated"] == 1.0
    assert not t.rollouts.data.fields["sample_valid"].any()


def test_min_new_tokens_reaches_the_sampler(tmp_path):
    """With a third of the vocabulary as stop ids some samples stop early; with
    `min_new_tokens` at `max_new_tokens` none does, and no stop id is sampled."""
    stops = tuple(range(0, 61, 3))  # the tiny vocabulary has 61 tokens
    early = task(tmp_path / "early", stop_ids=stops).rollouts.data
    assert early.completion_lengths_nk.min() < 8
    full = task(tmp_path / "full", stop_ids=stops, min_new_tokens=8).rollouts.data
    np.testing.assert_array_equal(full.completion_lengths_nk, 8)
    assert not np.isin(full.completion_tokens_t, stops).any()


def test_pref_grpo_reads_bradley_terry_win_probabilities(tmp_path):
    r = np.array([[1.0, 0.0, np.nan]])
    p = rl.win_matrix("bradley_terry", 2.0, r, ["x"], [["a", "b", "c"]], {})
    np.testing.assert_allclose(p[0, 0, 1], 1 / (1 + np.exp(-2.0)), rtol=1e-6)
    np.testing.assert_allclose(p[0] + p[0].T, np.ones((3, 3)), rtol=1e-6)
    def longer_wins(prompts, first, second, **_):  # a pairwise preference scorer
        return [float(len(a) > len(b)) for a, b in zip(first, second)]

    p = rl.win_matrix(longer_wins, 1.0, np.zeros((1, 3)), ["x"], [["aa", "a", "aaa"]], {})
    np.testing.assert_array_equal(p[0], [[0.5, 1, 0], [0, 0.5, 0], [1, 1, 0.5]])
    t = task(tmp_path, "pref_grpo")
    assert t.rollouts.data.fields["win_probs"].shape == (4, 4, 4)


def test_a_failing_reward_function_names_itself_and_the_prompt(tmp_path):
    def picky(prompts, completions, **_):
        if any(c.startswith("1") for c in completions):
            raise ValueError("no ones")
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"reward function picky failed on prompt \d+: "
                                                  "ValueError: no ones"):
        task(tmp_path, rewards=(picky,), max_new_tokens=16)
    assert not (tmp_path / "checkpoints").exists()


def test_conversational_prompts_reach_reward_functions_in_trls_form(tmp_path):
    """A conversational prompt reaches reward functions as its messages and each completion as
    one assistant message (TRL's convention); a text prompt's as text, row by row."""
    seen = []

    def trl_style(prompts, completions, **_):
        seen.append((prompts, completions))
        return [float(len((c if isinstance(c, str) else c[0]["content"]).split()) % 2)
                for c in completions]

    messages = [[{"role": "user", "content": f"question {i}"}] for i in range(3)] + [None]

    class Chat(rl.RolloutTask):
        def first_loader(self, model, vocab_size):
            self.prompts = rl.Prompts([[1 + i, 2, 3] for i in range(4)],
                                      [f"text {i}" for i in range(4)], {}, messages)
            return super().first_loader(model, vocab_size)

    config = rl.RLConfig(prompts_per_iteration=4, group_size=4, max_new_tokens=8,
                         rewards=(trl_style,))
    Chat(TINY, loop.DataSpec(layout="prefix"), build.AlgoConfig(loss="grpo"),
         optim.OptimConfig(warmup_steps=0), loop.LoopConfig(output_dir=str(tmp_path), seed=3),
         rl=config)
    prompts, completions = seen[0]
    assert len(prompts) == len(completions) == 16
    for prompt, completion in zip(prompts, completions):
        if isinstance(prompt, str):  # the text prompt: text in, text out
            assert prompt == "text 3" and isinstance(completion, str)
        else:
            assert prompt in messages[:3]
            assert isinstance(completion, list) and len(completion) == 1
            assert completion[0]["role"] == "assistant"
            assert isinstance(completion[0]["content"], str) and completion[0]["content"]
    assert sum(isinstance(p, str) for p in prompts) == 4


def test_reward_inputs_follow_each_prompts_form():
    prompts, completions = rl.reward_inputs(["a", "b"], [None, [{"role": "user", "content": "b"}]],
                                            ["x", "y", "z", "w"])
    assert prompts == ["a", [{"role": "user", "content": "b"}]]
    assert completions == ["x", "y", [{"role": "assistant", "content": "z"}],
                           [{"role": "assistant", "content": "w"}]]


def test_an_iteration_with_no_reward_says_so(tmp_path, capsys):
    def abstains(prompts, completions, **_):
        return [None] * len(completions)

    build.note.cache_clear()  # a note prints once per process; another test may have had it
    t = task(tmp_path, rewards=(abstains,))
    assert t.rollouts.metrics["samples_valid"] == 0
    assert "note: an iteration has no sample to learn from" in capsys.readouterr().out


def test_token_scorers_join_reward_functions():
    """`scorer:mean_token` scores the sampled ids; its column sits beside the text rewards."""
    rewards = RewardFunctions([EVEN, "scorer:mean_token"], [1.0, 0.5])
    tokens_bkc = np.array([[[2, 4, 0], [3, 3, 3]]])
    mask_bkc = np.array([[[1, 1, 0], [1, 1, 1]]])
    out = rewards([""] * 2, ["2 4", "3 3 3"], tokens=([[1]], tokens_bkc, mask_bkc))
    np.testing.assert_allclose(out.columns_nm, [[1.0, 3.0], [0.0, 3.0]])
    np.testing.assert_allclose(out.total_n, [2.5, 1.5])


def test_prompt_data_keeps_its_columns_and_names_a_bad_row(tmp_path):
    class Ids:  # a stand-in tokenizer: characters as ids
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 50 + 1 for c in text]}

    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+1?", "answer": "4"}\n')
    prompts = rl.load_prompts(str(good), Ids())
    assert prompts.texts == ["2+2?", "3+1?"] and prompts.fields == {"answer": ["4", "4"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2?"}\n\n{"question": "3+1?"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3, field 'prompt': expected"):
        rl.load_prompts(str(bad), Ids())


@pytest.mark.parametrize("binding,message", [
    ("RLConfig.minibatches=3", "RLConfig.minibatches \\(3\\) must divide prompts_per_iteration"),
    ("RLConfig.group_size=1", "RLConfig.group_size must be >= 2"),
    ("RLConfig.min_new_tokens=9", "RLConfig.min_new_tokens must be in \\[0, 8\\]"),
    ("AlgoConfig.hyper={'grpo': {'group_size': 8}}",
     "AlgoConfig.hyper group_size 8 differs from RLConfig.group_size 4"),
    ("DataSpec.layout='pack'", "unknown DataSpec.layout 'pack'"),
    ("DataSpec.layout='prefix_packed'; DataSpec.row_length=12",
     "DataSpec.row_length 12 holds no run of the longest prompt"),
])
def test_bad_settings_are_named(binding, message, tmp_path):
    with pytest.raises(Exception, match=message):
        run_cli(tmp_path, *binding.split("; "))


def test_implicit_reward_of_an_exported_policy_against_its_base(tmp_path):
    """`scorer:implicit:DIR@BETA` reads the base model from the export's prefopt_run.json and
    scores `beta sum_t (log pi - log pi_ref)` of the sampled tokens."""
    from prefopt_jax.models import save_pretrained
    from prefopt_jax.models.spec import load_model
    from prefopt_jax.sampling.scorers import Candidates, completion_logps

    policy, _ = load_model(loop.ModelSpec(seed=5))
    save_pretrained(policy, tmp_path, extra_files={
        "prefopt_run.json": json.dumps({"base_model": "tiny"})})
    rewards = RewardFunctions([f"scorer:implicit:{tmp_path}@0.5"])
    tokens_bkc = np.array([[[3, 9, 4], [8, 8, 1]]])
    mask_bkc = np.array([[[1, 1, 1], [1, 1, 0]]])
    out = rewards(["", ""], ["", ""], tokens=([[2, 7]], tokens_bkc, mask_bkc))
    cands = Candidates([[2, 7]], tokens_bkc, mask_bkc)
    want = 0.5 * ((completion_logps(policy, cands) - completion_logps(
        load_model(loop.ModelSpec())[0], cands)) * mask_bkc).sum(-1)
    np.testing.assert_allclose(out.total_n, want.reshape(-1), rtol=1e-4, atol=1e-6)
    assert np.all(out.total_n != 0)

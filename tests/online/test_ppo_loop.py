"""PPO and RTO in the online loop: the critic on the tiny random model.

Runs go through `prefopt train configs/experiments/ppo_tiny.gin`: the critic's values at
sampling time are kept with the rollouts and read by every update of the iteration, a separate
critic model trains beside the policy, the early stop on approximate KL ends an iteration's
updates, and a missing teacher or a mismatched critic is named.
"""

import json
import os

import numpy as np
import pytest

from prefopt_jax import cli
from prefopt_jax.data.tokenized import TokenizedData
from prefopt_jax.losses import ObjectiveError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PREFOPT_DEBUG", "1")


def run_cli(out, *bindings, config="configs/experiments/ppo_tiny.gin"):
    argv = ["train", config, f"--gin.LoopConfig.output_dir='{out}'", "--gin.LoopConfig.export=False",
            "--gin.LoopConfig.checkpoint_every=0", *(f"--gin.{b}" for b in bindings)]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_updates_read_the_critics_values_at_sampling_time(tmp_path):
    """One mini-batch, 2 epochs: step 1 sees every sample with the critic as it was when they
    were drawn, so the step's mean value equals the mean of the kept values; step 2 reads the
    same kept values (GAE's advantages do not move) while the critic has moved."""
    out = run_cli(tmp_path, "LoopConfig.steps=2", "RLConfig.minibatches=1")
    path = tmp_path / "rollouts" / "iter_000000.p0.npz"
    with np.load(path) as z:
        kept_nkc = z["old_values_nkc"]
    data = TokenizedData.load(str(path))
    lengths = np.diff(data.completion_offsets).reshape(kept_nkc.shape[:2])
    mask_nkc = np.arange(kept_nkc.shape[-1]) < lengths[..., None]
    assert mask_nkc.sum() == out[0]["tokens"]
    np.testing.assert_allclose(out[0]["ppo/values"], kept_nkc[mask_nkc].mean(), rtol=1e-5)
    assert out[1]["ppo/values"] != pytest.approx(out[0]["ppo/values"], rel=1e-4)
    assert out[0]["ppo/returns"] == pytest.approx(out[1]["ppo/returns"], rel=1e-6)


def test_a_separate_critic_model_trains_beside_the_policy(tmp_path):
    """`CriticConfig.source`: another model under the value head (here a random tiny one); the
    value loss falls over the run while the policy trains on the advantages."""
    out = run_cli(tmp_path, "LoopConfig.steps=16", "CriticConfig.source='tiny'", "CriticConfig.seed=7",
                  "CriticConfig.learning_rate=0.05",
                  "ModelSpec.overrides={'num_layers': 1}")
    value_loss = [r["ppo/value_loss"] for r in out]
    assert np.mean(value_loss[-4:]) < 0.5 * np.mean(value_loss[:4]), value_loss
    assert all(r["critic/grad_norm"] > 0 and np.isfinite(r["loss"]) for r in out)


def test_early_stop_on_approximate_kl_ends_the_iterations_updates(tmp_path):
    """With a tiny target KL, the first step of an iteration is on-policy (approx KL 0) and
    the second moves the policy past it: the third step samples the next iteration."""
    out = run_cli(tmp_path, "LoopConfig.steps=6", "RLConfig.target_kl=1e-9")
    assert [r["iteration"] for r in out] == [0, 0, 1, 1, 2, 2]
    assert [r["approx_kl"] < 1e-9 for r in out] == [True, False] * 3
    assert [r["early_stopped"] for r in out] == [0.0, 1.0] * 3
    plain = run_cli(tmp_path / "plain", "LoopConfig.steps=6")
    assert [r["iteration"] for r in plain] == [0, 0, 0, 0, 1, 1]


def test_a_reward_model_checkpoint_is_the_reward(tmp_path):
    """`scorer:rm:DIR`: a `RewardHead` checkpoint scores each sample (prompt and reply); the
    rewards the update reads are its scores."""
    from prefopt_jax.models.spec import ModelSpec, load_model
    from prefopt_jax.rewards import reward_model

    trunk = load_model(ModelSpec(overrides=(("num_layers", 1),), seed=4))[0]
    reward_model.save(reward_model.new_reward_model(trunk, init_scale=1.0, seed=5),
                      str(tmp_path / "rm"))
    out = run_cli(tmp_path / "run", "LoopConfig.steps=1", "RLConfig.minibatches=1",
                  "RLConfig.epochs=1", f"RLConfig.rewards=['scorer:rm:{tmp_path / 'rm'}']")
    rollouts = TokenizedData.load(str(tmp_path / "run" / "rollouts" / "iter_000000.p0.npz"))
    want_nk = reward_model.score_examples(reward_model.load(str(tmp_path / "rm"))[0], rollouts)
    np.testing.assert_allclose(rollouts.fields["rewards"], want_nk, rtol=1e-4, atol=1e-5)
    assert np.ptp(want_nk) > 0 and out[0]["reward/mean"] == pytest.approx(want_nk.mean(),
                                                                           rel=1e-4)


def test_par_shapes_a_token_reward_against_the_reference_policys_replies(tmp_path):
    """`scorer:par:mean_token@3`: each sample's reward is `(1/3) sum_m s(r(y) - r(y_ref_m))`
    over 3 replies of the reference (here the initial policy) to its prompt."""
    from prefopt_jax.models.spec import ModelSpec, load_model
    from prefopt_jax.rewards.scorers import PARScorer, mean_token_scorer
    from prefopt_jax.sampling.generate import SamplingConfig
    from prefopt_jax.sampling.scorers import Candidates

    run_cli(tmp_path, "LoopConfig.steps=1", "RLConfig.minibatches=1", "RLConfig.epochs=1",
            "RLConfig.rewards=['scorer:par:mean_token@3']")
    data = TokenizedData.load(str(tmp_path / "rollouts" / "iter_000000.p0.npz"))
    prompts = [data.prompt_tokens_t[a:b] for a, b in zip(data.prompt_offsets[:-1],
                                                          data.prompt_offsets[1:])]
    k = data.num_completions
    tokens_bkc = np.zeros((len(prompts), k, 8), np.int32)
    mask_bkc = np.zeros_like(tokens_bkc)
    for n, (a, b) in enumerate(zip(data.completion_offsets[:-1], data.completion_offsets[1:])):
        tokens_bkc[n // k, n % k, :b - a] = data.completion_tokens_t[a:b]
        mask_bkc[n // k, n % k, :b - a] = 1
    seed = int(np.random.default_rng([0, 0]).integers(2 ** 31))  # iteration 0 starts at draw 0
    par = PARScorer(mean_token_scorer, load_model(ModelSpec(overrides=(("num_layers", 1),)))[0],
                    num_ref=3, config=SamplingConfig(max_new_tokens=8), seed=seed)
    want_bk = par(Candidates(prompts, tokens_bkc, mask_bkc))
    np.testing.assert_allclose(data.fields["rewards"], want_bk, rtol=1e-5)
    assert 0 < want_bk.min() and want_bk.max() < 1 and np.ptp(want_bk) > 0


@pytest.mark.parametrize("bindings,error,message", [
    (["CriticConfig.source='random:smollm2-135m'"], ObjectiveError,
     "CriticConfig.source 'random:smollm2-135m' has a vocabulary of 49152, the policy 61"),
    (["RLConfig.target_kl=0"], Exception, "RLConfig.target_kl must be > 0"),
    (["RLConfig.advantage_per_reward=True"], Exception,
     "RLConfig.advantage_per_reward: ppo does not estimate group advantages"),
])
def test_bad_critic_settings_are_named(bindings, error, message, tmp_path):
    with pytest.raises(error, match=message):
        run_cli(tmp_path, *bindings)


def test_rto_needs_a_dpo_teacher(tmp_path):
    with pytest.raises(ObjectiveError, match="objective 'rto' needs token_rewards.*TeacherConfig"):
        run_cli(tmp_path, "AlgoConfig.loss='rto'", "AlgoConfig.teacher=None")

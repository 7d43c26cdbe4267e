"""Every registered objective, and every modifier, trains from a config file.

`prefopt train configs/experiments/tiny.gin configs/algos/NAME.gin` runs 2 steps on the tiny
model with synthetic data of the kind NAME declares (paired, triple, unpaired, listwise, with
win probabilities), a random tiny DPO teacher where NAME reads one, and margins from it; the
loss is finite at every step and the exported weights differ from the initial ones. RL
objectives train in the online loop (`@train_online`, picked by their inputs) on tiny.gin's
random prompts, rewarded by the share of even token ids; ppo and rto with a value head on the
policy's trunk trained in the same step. Diffusion objectives train the tiny DiT from
configs/experiments/diffusion_tiny.gin (synthetic images of their kind, or their own sampled
trajectories rewarded by stroke contrast) and export a diffusion model. Each modifier runs on
`dpo` and on `ipo`, and the MPO mix on its own. Bad choices fail with a message naming them.
"""

import glob
import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from prefopt_jax import cli, losses
from prefopt_jax.diffusion import spec as diffusion_spec
from prefopt_jax.diffusion.spec import DiffusionModelSpec
from prefopt_jax.losses import ObjectiveError
from prefopt_jax.models import from_pretrained
from prefopt_jax.models.spec import ModelSpec, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = losses.names()
MODIFIERS = ["f_divergence_js", "wpo", "ld_dpo", "reference_free"]


def train(out, *files, bindings=(), experiment="configs/experiments/tiny.gin"):
    """`prefopt train` in this process; the run's metric records."""
    argv = ["train", experiment, *files,
            f"--gin.LoopConfig.output_dir='{out}'", *(f"--gin.{b}" for b in bindings)]
    assert cli.main(argv) == 0
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def initial_params() -> list[np.ndarray]:
    return params(load_model(ModelSpec(overrides={"num_layers": 1}))[0])


def diffusion_params(source) -> list[np.ndarray]:
    return params(diffusion_spec.load(DiffusionModelSpec(source=source, num_timesteps=100))[0]
                  if source == "tiny" else diffusion_spec.load(DiffusionModelSpec(source))[0])


def assert_trained(out, records, diffusion=False):
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records), records
    if diffusion:
        trained, initial = diffusion_params(str(out / "export")), diffusion_params("tiny")
    else:
        export = out / "export" if (out / "export").exists() else out / "reward_model" / "trunk"
        trained = params(from_pretrained(str(export), load_tokenizer=False)[0])
        initial = initial_params()
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(trained, initial))
    assert change > 0, "no trained parameter changed"


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PREFOPT_DEBUG", "1")  # user errors raise (the CLI would print them)


def test_every_objective_has_its_config_and_nothing_else():
    names = {os.path.basename(p)[:-4] for p in glob.glob(f"{ROOT}/configs/algos/*.gin")}
    assert names - {"reward_model"} == set(losses.names())


@pytest.mark.parametrize("name", TRAINED)
def test_objective_trains_from_its_config(name, tmp_path, capsys):
    diffusion = losses.info(name).inputs in losses.DIFFUSION_INPUTS
    experiment = f"configs/experiments/{'diffusion_' if diffusion else ''}tiny.gin"
    records = train(tmp_path, f"configs/algos/{name}.gin", experiment=experiment)
    assert_trained(tmp_path, records, diffusion)
    progress = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert len(progress) == 2 and not any("nan" in ln for ln in progress), progress
    if losses.info(name).inputs == "unpaired":  # no pairs: rewards of each label instead
        assert all(" desirable " in ln and " undesirable " in ln for ln in progress), progress
    if losses.info(name).inputs == "rollout":  # trained on its own samples, by the online loop
        assert (tmp_path / "rollouts").is_dir()
    if "critic" in losses.info(name).needs:  # the critic learns in the same step
        assert records[0]["critic/grad_norm"] > 0 and "ppo/value_loss" in records[0], records[0]
    if losses.info(name).inputs == "trajectory":  # rewarded samples of the policy itself
        assert records[0]["rewards/mean"] > 0 and "tokens" not in records[0], records[0]


@pytest.mark.parametrize("modifier", MODIFIERS)
@pytest.mark.parametrize("name", ["dpo", "ipo"])
def test_modifier_trains_on_margin_losses(name, modifier, tmp_path):
    records = train(tmp_path, f"configs/algos/{name}.gin", f"configs/modifiers/{modifier}.gin")
    assert_trained(tmp_path, records)
    if modifier == "wpo":
        assert 0 < records[0]["wpo/weight"] < 1  # exp(mean_t(l_t - log sum_v p_v^2)) of 2 sides


def test_mpo_mix_trains(tmp_path):
    records = train(tmp_path, "configs/modifiers/mix_mpo.gin")
    assert_trained(tmp_path, records)
    assert {"dpo/loss", "bco_pair/loss", "sft/loss"} <= set(records[0])


def test_rollout_objectives_are_refused_by_the_preference_loop(tmp_path):
    from prefopt_jax.train import build, loop, optim
    algo = build.AlgoConfig(loss="grpo", hyper={"grpo": {"group_size": 4}})
    with pytest.raises(ObjectiveError, match="objective 'grpo' trains on rollouts.*train_online"):
        loop.PolicyTask(ModelSpec(), loop.DataSpec(), algo, optim.OptimConfig(),
                        loop.LoopConfig(output_dir=str(tmp_path)))


@pytest.mark.parametrize("files,bindings,message", [
    (["configs/algos/dpo.gin"], ["AlgoConfig.hyper={'betta': 0.1}"],
     "objective 'dpo' has no hyper-parameter 'betta'; its hyper-parameters: beta, "
     "label_smoothing"),
    (["configs/algos/dpo.gin"], ["AlgoConfig.loss='dpoo'"], "unknown loss 'dpoo'; known losses"),
    (["configs/algos/kto.gin", "configs/modifiers/wpo.gin"], [],
     "modifier 'wpo' does not apply to 'kto': it reads pairwise inputs, the objective reads "
     "unpaired inputs"),
    (["configs/algos/sft.gin", "configs/modifiers/f_divergence_js.gin"], [],
     "modifier 'f_divergence' does not apply to 'sft': f-divergences replace the log-ratios of "
     "the margin losses"),
    (["configs/algos/simpo.gin", "configs/modifiers/reference_free.gin"], [],
     "modifier 'reference_free' does not apply to 'simpo': the objective reads no reference"),
    (["configs/algos/dpo.gin"], ["AlgoConfig.modifiers=[('ld_dpo', {})]"],
     "modifier 'ld_dpo' needs parameter 'alpha'"),
    (["configs/algos/dpo.gin"], ["AlgoConfig.modifiers=[('f_divergence', {'divergence': 'x'})]"],
     "modifier 'f_divergence': unknown divergence 'x'"),
    (["configs/algos/dpo.gin"], ["AlgoConfig.modifiers=[('wpoo', {})]"],
     "unknown modifier 'wpoo'; known: f_divergence, ld_dpo, reference_free, wpo"),
    (["configs/modifiers/mix_mpo.gin"], ["AlgoConfig.mix=[('dpo', 1.0), ('kto', 1.0)]"],
     "combines objectives of one inputs type; got dpo \\(pairwise\\), kto \\(unpaired\\)"),
    (["configs/algos/tgdpo.gin"], ["AlgoConfig.teacher=None"],
     "objective 'tgdpo' needs token_rewards: per-token rewards .*set AlgoConfig.teacher"),
    (["configs/algos/aligndistil.gin"], ["ReferenceConfig.kind='precomputed'"],
     "needs the teacher's reference logits .* reference kind 'precomputed' keeps no model"),
    (["configs/algos/modpo.gin"], ["AlgoConfig.margins=[]"],
     "objective 'modpo' needs margins: .*set AlgoConfig.margins"),
    (["configs/algos/modpo.gin"], ["AlgoConfig.margins=['rm']"],
     "AlgoConfig.margins: unknown source 'rm'"),
    (["configs/algos/modpo.gin"], ["AlgoConfig.hyper={'weights': (0.5, 0.3, 0.2)}"],
     "objective 'modpo': modpo: 3 weights need 2 other rewards"),
    (["configs/algos/dpo.gin"], ["ReferenceConfig.kind='none'"],
     "objective 'dpo' needs a reference; ReferenceConfig.kind is 'none'"),
])
def test_bad_choices_fail_before_training_naming_the_culprit(files, bindings, message,
                                                             tmp_path):
    with pytest.raises(ObjectiveError, match=message):
        train(tmp_path, *files, bindings=bindings)
    assert not (tmp_path / "metrics.jsonl").exists()

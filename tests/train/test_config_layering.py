"""Configs do what they say: a loss switch takes the new objective's defaults and refuses
another objective's hyper-parameters, algo files leave the reference kind to the experiment,
and the schedule spans the run unless set on purpose (then a warning says so)."""

import os

import gin
import pytest

from prefopt_jax import losses, registry
from prefopt_jax.losses import ObjectiveError, hyper_defaults
from prefopt_jax.train import build, optim

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    yield
    gin.clear_config()


def configured(files, bindings=()):
    """The AlgoConfig, ModelSpec and OptimConfig the gin files and bindings build."""
    registry.parse(files, list(bindings))
    return (gin.get_configurable("AlgoConfig")(), gin.get_configurable("ModelSpec")(),
            gin.get_configurable("OptimConfig")())


def test_loss_switch_takes_the_new_objectives_defaults():
    algo, _, _ = configured(["configs/experiments/tiny.gin", "configs/algos/dpo.gin"],
                            ["AlgoConfig.loss='simpo'"])
    objective = algo.objective()
    assert objective.name == "simpo"
    assert dict(objective.hyper) == {}  # nothing of DPO's (beta 0.1) carried over
    assert hyper_defaults(losses.get("simpo"))["beta"] == 2.0  # what the loss then uses
    algo, _, _ = configured(["configs/experiments/tiny.gin", "configs/algos/simpo.gin"])
    assert dict(algo.objective().hyper)["beta"] == 2.0


def test_foreign_hyper_parameters_are_refused_naming_the_objectives_own():
    algo = build.AlgoConfig(loss="ipo", hyper={"beta": 0.1, "label_smoothing": 0.0})
    with pytest.raises(ObjectiveError, match="objective 'ipo' has no hyper-parameter "
                                             "'label_smoothing'; its hyper-parameters: beta"):
        algo.objective()
    keyed = build.AlgoConfig(loss="ipo", hyper={"dpo": {"beta": 0.3}, "ipoo": {"beta": 1.0}})
    with pytest.raises(ObjectiveError, match=r"unknown objectives \['ipoo'\]"):
        keyed.objective()


def test_algo_files_leave_the_reference_kind_to_the_experiment():
    lora_run = ["configs/experiments/dpo_smollm2_lora.gin"]
    for extra in ([], ["configs/algos/ipo.gin"]):
        algo, model, _ = configured(lora_run + extra)
        assert algo.resolved(model.lora).reference.kind == "lora"
    algo, model, _ = configured(["configs/experiments/tiny.gin", "configs/algos/ipo.gin"])
    assert model.lora is None and algo.resolved(model.lora).reference.kind == "frozen"
    algo, model, _ = configured(lora_run + ["configs/algos/simpo.gin"])
    assert algo.resolved(model.lora).reference.kind == "none"  # reference-free objective
    algo, model, _ = configured(lora_run, ["ReferenceConfig.kind='frozen'"])
    assert algo.resolved(model.lora).reference.kind == "frozen"  # chosen on purpose: kept


def test_schedule_follows_the_run_unless_set_on_purpose(capsys):
    _, _, opt = configured(["configs/experiments/tiny.gin"], ["LoopConfig.steps=5"])
    assert opt.total_steps is None
    assert optim.for_run(opt, 5).total_steps == 5
    assert capsys.readouterr().out == ""
    fixed = optim.OptimConfig(total_steps=200)
    assert optim.for_run(fixed, 5).total_steps == 200
    warning = capsys.readouterr().out
    assert "OptimConfig.total_steps=200 but LoopConfig.steps=5" in warning
    schedule = optim.schedule(optim.for_run(optim.OptimConfig(learning_rate=1.0), 4))
    assert float(schedule(4)) == pytest.approx(0.0)  # the cosine reaches its end at step 4

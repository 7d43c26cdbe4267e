"""Every .gin under configs/ parses and runs one step with tiny overrides (one test per file).

Objective files (configs/algos/) and modifier files (configs/modifiers/) are run by
tests/test_objectives.py, two steps each with data of the kind they declare; here: the
experiments on their own, and the model, data, optimiser, mesh and reward-model files on top of
a DPO base. Every one must train: no file is allowed to fail.
"""

import glob
import math
import os

import pytest

from prefopt_jax import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/configs/**/*.gin",
                                                           recursive=True)
               if not p.startswith((f"{ROOT}/configs/algos/", f"{ROOT}/configs/modifiers/"))
               or p.endswith("reward_model.gin"))
BASE = ["configs/models/tiny.gin", "configs/algos/dpo.gin", "configs/optim/adamw_cosine.gin",
        "configs/data/tiny_padded.gin", "configs/mesh/single.gin"]
TINY = ["train.tiny = True", "train.loop = @LoopConfig()", "LoopConfig.steps = 1",
        "LoopConfig.export = False", "DataSpec.tiny_examples = 8", "OptimConfig.total_steps = 2",
        "LoopConfig.checkpoint_every = 0", "ModelSpec.overrides = {'num_layers': 1}"]


def test_objective_and_modifier_files_are_left_to_test_objectives():
    assert "configs/experiments/tiny.gin" in FILES and "configs/algos/dpo.gin" not in FILES


@pytest.mark.parametrize("path", FILES)
def test_config_runs_one_step(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    files = [path] if path.startswith("configs/experiments/") else BASE + [path]
    registry.parse(files, TINY + [f"LoopConfig.output_dir = '{tmp_path}'"])
    values = registry.train()
    assert math.isfinite(values["loss"])
    assert os.path.exists(tmp_path / "operative_config.gin")


def test_unknown_binding_lists_close_names():
    with pytest.raises(registry.ConfigError, match="OptimConfig.learning_rate"):
        registry.parse(BASE, ["OptimConfig.learnin_rate = 1.0"])
    with pytest.raises(registry.ConfigError, match="close names"):
        registry.parse(BASE, ["OptimConfg.name = 'sgd'"])

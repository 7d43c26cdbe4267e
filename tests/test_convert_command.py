"""`prefopt convert`: a model directory, and a training run's checkpoint with LoRA merged, to
Hugging Face directories that load back with the same logits; the user errors.

The run is the tiny DPO run (configs/experiments/tiny.gin) with LoRA adapters of rank 2,
trained for 2 steps in-process with a checkpoint after each step and its own export.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import cli, registry
from prefopt_jax.errors import ModelSourceError
from prefopt_jax.models import from_pretrained, save_pretrained
from prefopt_jax.models.presets import tiny_config
from prefopt_jax.models.spec import ModelSpec, load_model, random_model

TOKENS_BT = np.arange(1, 12, dtype=np.int32)[None]
TINY_LORA_RUN = ["configs/experiments/tiny.gin", "configs/models/lora.gin"]


def logits(model) -> np.ndarray:
    positions_bt = np.arange(TOKENS_BT.shape[1], dtype=np.int32)[None]
    return np.asarray(model(TOKENS_BT, positions_bt), np.float32)


def convert(*argv) -> int:
    """The sub-command's function itself, so user errors propagate to pytest.raises."""
    args = cli.build_parser().parse_args(["convert", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step LoRA DPO run with checkpoints at steps 1 and 2 and its own export/."""
    out = tmp_path_factory.mktemp("run")
    registry.parse(TINY_LORA_RUN, [
        f"LoopConfig.output_dir = '{out}'", "LoopConfig.checkpoint_every = 1",
        "LoopConfig.export = True", "LoraConfig.rank = 2", "LoraConfig.alpha = 4.0",
        "OptimConfig.learning_rate = 1e-2"])
    registry.train()
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"]
    return out


def test_hf_directory_converts_to_the_same_logits(tmp_path):
    model = random_model(tiny_config(), seed=3)
    save_pretrained(model, tmp_path / "src")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "f32")]) == 0
    want = logits(model)
    np.testing.assert_allclose(logits(from_pretrained(tmp_path / "f32")[0]), want,
                               rtol=0, atol=1e-6)

    assert convert(tmp_path / "src", tmp_path / "bf16", "--dtype", "bfloat16") == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    got = logits(from_pretrained(tmp_path / "bf16", dtype=jnp.float32)[0])
    assert 0 < np.max(np.abs(got - want)) < 0.05  # rounded to bfloat16, not dropped

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"))
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(TOKENS_BT.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(hf_logits, want, atol=1e-4)


def test_run_converts_to_its_own_lora_merged_export(tmp_path, lora_run):
    assert convert(lora_run, tmp_path / "newest") == 0
    got = logits(from_pretrained(tmp_path / "newest")[0])
    export = logits(from_pretrained(lora_run / "export")[0])
    np.testing.assert_allclose(got, export, rtol=0, atol=1e-6)
    operative = tmp_path / "newest" / "operative_config.gin"  # when exports carry it
    if operative.exists():
        assert operative.read_text() == (lora_run / "operative_config.gin").read_text()
    base = load_model(ModelSpec(overrides={"num_layers": 1}))[0]  # the run's base weights
    assert np.max(np.abs(got - logits(base))) > 1e-3, "the checkpoint's adapters were ignored"

    assert convert(lora_run, tmp_path / "step1", "--step", "1") == 0
    step1 = logits(from_pretrained(tmp_path / "step1")[0])
    assert np.max(np.abs(step1 - got)) > 1e-4, "--step 1 exported the newest checkpoint"
    assert np.max(np.abs(step1 - logits(base))) > 1e-4


def test_user_errors_name_the_culprit(tmp_path, lora_run, capsys):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelSourceError, match="no_such_model"):
        convert(missing, tmp_path / "out")
    assert cli.main(["convert", str(missing), str(tmp_path / "out")]) == 2
    assert "no_such_model" in capsys.readouterr().err

    with pytest.raises(ModelSourceError) as err:
        convert(lora_run, tmp_path / "out", "--step", "99")
    assert "--step 99" in str(err.value) and "steps there: 1, 2" in str(err.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="neither a training run"):
        convert(tmp_path / "empty", tmp_path / "out")

    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(lora_run / "operative_config.gin", no_ckpt)
    with pytest.raises(ModelSourceError, match="saved no checkpoint"):
        convert(no_ckpt, tmp_path / "out")

    reward = tmp_path / "reward_run"
    reward.mkdir()
    (reward / "operative_config.gin").write_text(
        "include 'configs/experiments/reward_model_tiny.gin'\n")
    with pytest.raises(ModelSourceError, match="policy runs only"):
        convert(reward, tmp_path / "out")
    assert not (tmp_path / "out").exists()

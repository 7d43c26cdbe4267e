"""`prefopt eval CONFIG.gin` and `prefopt eval implicit-vs-explicit` on tiny models."""

import json
import os

import numpy as np

from prefopt_jax import cli
from prefopt_jax.data.synthetic import synthetic_rows, tiny_tokenizer
from prefopt_jax.rewards import reward_model
from prefopt_jax.train import tiny
from prefopt_jax.models.spec import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = "configs/experiments/eval_dpo_tiny.gin"


def test_eval_config_after_training(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = f"--gin.LoopConfig.output_dir='{tmp_path}'"
    small = ["--gin.LoopConfig.steps=2", "--gin.DataSpec.tiny_examples=8",
             "--gin.LoopConfig.checkpoint_every=0"]
    assert cli.main(["train", CONFIG, out] + small) == 0
    assert cli.main(["eval", CONFIG, out, "--gin.DataSpec.tiny_examples=8"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    pairs, samples = result["pairs"], result["samples"]
    for key in ("implicit_reward_accuracy", "ranking_accuracy",
                "ranking_accuracy_length_normalised", "idealised_ranking_accuracy"):
        assert 0.0 <= pairs[key] <= 1.0
    assert pairs["pairs"] == 8 and result["beta"] == 0.1
    assert 0.0 <= samples["win_rate"] <= 1.0 and samples["kl_k3"] >= 0.0
    assert np.isfinite(samples["kl_k1"]) and samples["lengths"]["max"] <= 8


def test_implicit_vs_explicit(tmp_path):
    from prefopt_jax.models import save_pretrained

    tokenizer = tiny_tokenizer()
    config = tiny.config(vocab_size=len(tokenizer))
    policy = random_model(config)
    ref = random_model(config)
    save_pretrained(policy, tmp_path / "policy", tokenizer)
    save_pretrained(ref, tmp_path / "ref", tokenizer)
    reward_model.save(reward_model.new_reward_model(policy, init_scale=1.0, seed=5),
                      str(tmp_path / "rm"), tokenizer)
    for name, seed, fmt in (("heldout", 0, "preference"), ("shifted", 1, "implicit_preference")):
        rows = synthetic_rows(6, fmt, seed=seed)
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ive.json"
    assert cli.main(["eval", "implicit-vs-explicit", "--policy", str(tmp_path / "policy"),
                     "--ref", str(tmp_path / "ref"), "--rm", str(tmp_path / "rm"),
                     "--data", str(tmp_path / "heldout.jsonl"),
                     "--shifted", str(tmp_path / "shifted.jsonl"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for name in ("in_distribution", "shifted"):
        assert result[name]["pairs"] == 6
        assert 0.0 <= result[name]["explicit_accuracy"] <= 1.0
        # Policy == reference here, so every implicit reward is 0: no pair is ranked right.
        assert result[name]["implicit_accuracy"] == 0.0

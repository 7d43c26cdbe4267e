"""The sentiment studies' helpers (experiments/sentiment_lab.py and the studies' run.py files):
staged training follows one run, the frontier and matched-KL readings, best-of-N's KL, the
ranking study's measures, the label-noise objectives, the off-policy data and the score prompts.
The studies' figures themselves come from their committed commands (their READMEs)."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import sentiment_lab as lab  # noqa: E402


def load(study: str, name: str = "run.py"):
    path = ROOT / "experiments" / study / name
    spec = importlib.util.spec_from_file_location(f"{study}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_follow_the_one_run_trajectory(tmp_path):
    """Two resumed stages of 2 steps log the same losses as one 4-step run (the schedule spans
    4 steps in both), and a run left in the directory is replaced, not resumed."""
    tiny = "configs/experiments/quickstart_tiny.gin"
    one = str(tmp_path / "one")
    lab.prefopt("train", tiny, f"--gin.LoopConfig.output_dir='{one}'",
                "--gin.LoopConfig.steps=4", "--gin.LoopConfig.checkpoint_every=2")
    staged = str(tmp_path / "staged")
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "metrics.jsonl").write_text('{"step": 9, "loss": 0.0}\n')
    stages = [step for step, _ in lab.train_in_stages(staged, 4, 2, config=tiny)]
    assert stages == [2, 4]
    ours, theirs = lab.read_metrics(staged), lab.read_metrics(one)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs],
                               rtol=1e-6)
    assert ours[-1]["loss"] != ours[0]["loss"]


def test_pareto_front():
    points = {"a": (0.0, 0.4), "b": (1.0, 0.8), "c": (2.0, 0.7), "d": (2.0, 0.9),
              "e": (0.0, 0.3), "f": (3.0, 0.9)}
    assert lab.pareto(points) == ["a", "b", "d"]


def test_mean_se():
    mean, se = lab.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)


def test_best_of_n_kl_and_matched_kl():
    frontier = load("frontier_sentiment")
    assert frontier.best_of_n_kl(1) == 0.0
    assert frontier.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    on_off = load("onpolicy_vs_offpolicy")
    on = [{"kl": 2.0, "sentiment": 0.6}, {"kl": 6.0, "sentiment": 0.8}]
    assert on_off.at_matched_kl(on, 3.0) == pytest.approx(0.65)
    assert on_off.at_matched_kl(on, 7.0) is None


def test_ranking_measures_and_difficulty_bins():
    ranking = load("ranking_accuracy")
    ref = {"w": np.array([-10.0, -20.0, -30.0]), "l": np.array([-12.0, -15.0, -20.0]),
           "n_w": np.array([5.0, 5.0, 10.0]), "n_l": np.array([5.0, 5.0, 5.0])}
    pol = dict(ref, w=ref["w"] + np.array([0.0, 6.0, 1.0]))
    m = ranking.measures(pol, ref)
    # pol: -10 > -12 yes; -14 > -15 yes; -29 > -20 no.
    assert m["ranking_accuracy"] == pytest.approx(2 / 3)
    # per token: -2 > -2.4 yes; -2.8 > -3 yes; -2.9 > -4 yes.
    assert m["ranking_accuracy_length_normalised"] == 1.0
    assert m["implicit_reward_accuracy"] == pytest.approx(2 / 3)  # the first pair's margin is 0
    # idealised: ref log-ratios 2, -5, -10 plus 10 log(alpha/(1-alpha)): 4.05 at alpha 0.6.
    assert m["idealised_alpha_0.6"] == pytest.approx(1 / 3)
    assert m["idealised_alpha_0.99"] == 1.0
    rows = ranking.difficulty_table(pol, ref, edges=(0.0, 6.0, np.inf))
    # the reference ranks pairs 2 (c = 5) and 3 (c = 10) wrong; DPO fixed pair 2 only.
    assert [(r["pairs"], r["fixed"], r["loss_below_threshold"]) for r in rows] == [
        (1, 1, 1), (1, 0, 0)]


def test_label_noise_objectives_and_tabular_sweep():
    noise = load("label_noise")
    assert noise.objective("DPO", 0.2, 0.1) == ("dpo", {"beta": 0.1, "label_smoothing": 0.0})
    assert noise.objective("cDPO", 0.2, 0.1) == ("dpo", {"beta": 0.1, "label_smoothing": 0.2})
    assert noise.objective("rDPO", 0.2, 0.1) == ("robust", {"beta": 0.1,
                                                            "label_smoothing": 0.2})
    assert noise.train_args("rDPO", 0.3)[:2] == ["--gin.DataSpec.flip_rate=0.3",
                                                  "configs/algos/robust.gin"]
    sweep = noise.tabular_sweep([0.0, 0.3], [0], steps=60)
    kl = {m: sweep[m]["0.3"]["kl_to_optimum"][0] for m in noise.METHODS}
    assert kl["rDPO"] < 1e-3 < kl["DPO"] < kl["cDPO"]
    assert sweep["DPO"]["0.0"]["kl_to_optimum"][0] < 1e-3


def test_offpolicy_pairs_cover_the_quickstart_prompts(tmp_path):
    make = load("onpolicy_vs_offpolicy", "make_data.py")
    make.main(out=str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    quick = [json.loads(line) for line in open(ROOT / lab.TRAIN)]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in quick]
    assert all(r["score_chosen"] >= r["score_rejected"] + 0.05 for r in rows)
    committed = (ROOT / "experiments/onpolicy_vs_offpolicy/data/train.jsonl").read_text()
    assert (tmp_path / "train.jsonl").read_text() == committed


def test_reward_augmented_prompts_ask_for_the_score():
    augmented = load("reward_augmented")
    prompts = lab.read_prompts()[:2]
    asked = augmented.conditioned(prompts, 1.0)
    assert asked[0][0] == {"role": "system", "content": "Write a response that would be rated 1."}
    assert asked[0][1:] == prompts[0]

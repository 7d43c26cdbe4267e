"""The quickstart pipeline end to end on its tiny CI version (quickstart_tiny.gin).

The tiny random model (SmolLM2's vocabulary) trains two DPO+LoRA steps on synthetic pairs, then
the real report runs on two committed held-out prompts with SmolLM2's tokenizer. The real result
(sentiment going up) is recorded by the full run in experiments/quickstart/README.md.
"""

import importlib.util
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_run_module():
    spec = importlib.util.spec_from_file_location(
        "quickstart_run", ROOT / "experiments" / "quickstart" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer saved as a HF directory once per session (converting it takes ~20 s)."""
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    if not (path / "tokenizer.json").exists():
        import sys
        sys.path.insert(0, str(ROOT / "experiments" / "quickstart"))
        import report
        report.load_tokenizer("smollm2-135m-instruct").save_pretrained(str(path))
    return str(path)


def test_quickstart_tiny_writes_the_report(tmp_path, tokenizer_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    code = load_run_module().main([
        "configs/experiments/quickstart_tiny.gin", f"--gin.LoopConfig.output_dir='{out}'",
        "--prompts", "2", "--max-new-tokens", "6", "--side-by-side", "2",
        "--tokenizer", tokenizer_dir])
    assert code == 0
    for name in ("report.json", "report.md", "curves.png", "metrics.jsonl", "export"):
        assert (out / name).exists(), name
    result = json.loads((out / "report.json").read_text())
    for key in ("reward_accuracy", "reward_margin", "heldout_pairs", "kl", "kl_stderr",
                "kl_samples", "sentiment", "side_by_side", "seconds", "steps"):
        assert key in result, key
    assert result["steps"] == 2 and result["kl_samples"] == 2
    assert result["heldout_pairs"] > 0 and 0.0 <= result["reward_accuracy"] <= 1.0
    assert set(result["sentiment"]) >= {"reference", "policy", "improved", "worsened"}
    assert len(result["side_by_side"]) == 2
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and "[report 6/6]" in printed
    assert "mean sentiment of greedy replies, policy" in printed
    assert os.path.getsize(out / "report.md") > 0

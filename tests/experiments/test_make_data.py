"""The pair builders of the experiments: VADER ranking, near-ties, disjoint held-out subjects."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load(relative: str, name: str):
    sys.path.insert(0, str(ROOT / "experiments" / "quickstart"))  # the reuse imports make_data
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_to_rows_ranks_by_sentiment_and_counts_near_ties():
    quickstart = load("experiments/quickstart/make_data.py", "qs_make_data")
    prompts = ["Give a short opinion about tea.", "Give a short opinion about rain.",
               "Give a short opinion about maps."]
    pairs = [("It is awful and sad.", "It is wonderful, I love it!"),  # swapped: chosen second
             ("It is a map.", "It is a map!"),                         # a near-tie: left out
             ("Great, lovely, happy.", "")]                            # an empty reply: left out
    rows, ties = quickstart.to_rows(prompts, pairs, min_gap=0.05)
    assert ties == 2 and len(rows) == 1
    row = rows[0]
    assert row["chosen"][0]["content"] == "It is wonderful, I love it!"
    assert row["score_chosen"] > row["score_rejected"]
    assert row["prompt"] == [{"role": "user", "content": prompts[0]}]


def test_reward_model_heldout_subjects_are_new_and_options_shared():
    quickstart = load("experiments/quickstart/make_data.py", "qs_make_data2")
    rm = load("experiments/reward_model_sentiment/make_data.py", "rm_make_data")
    seen = set(quickstart.SUBJECTS) | set(quickstart.HELDOUT_SUBJECTS)
    assert not set(rm.SUBJECTS) & seen
    assert not set(rm.SHIFTED_TEMPLATES) & set(quickstart.TEMPLATES)
    args = quickstart.sampling_parser("x", "out/dir", 7).parse_args([])
    assert (args.out, args.seed, args.min_gap) == ("out/dir", 7, 0.05)


def test_write_split_writes_ranked_pairs(tmp_path, monkeypatch, capsys):
    import argparse
    import json

    quickstart = load("experiments/quickstart/make_data.py", "qs_make_data3")
    replies = [("Bad and boring.", "Lovely and great!"), ("A chair.", "A table.")]
    monkeypatch.setattr(quickstart, "sample_pairs", lambda *a: replies)
    args = argparse.Namespace(batch_size=2, max_new_tokens=8, temperature=1.0, min_gap=0.05)
    path = tmp_path / "split.jsonl"
    quickstart.write_split(None, None, ["Opinion on a?", "Opinion on b?"], 0, args, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["chosen"][0]["content"] for r in rows] == ["Lovely and great!"]
    assert "split: 1 pairs written, 1 near-ties left out" in capsys.readouterr().out

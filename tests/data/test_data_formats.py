"""Every dataset format, from local files written by the test, tokenised by the tiny tokenizer."""

import json
import math

import numpy as np
import pytest

from prefopt_jax.data import DataConfig, Loader, prepare


def config(**kw):
    return DataConfig(cache_dir=None, **kw)


def decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False)


def chat(role, content):
    return {"role": role, "content": content}


def test_explicit_text_preference_from_jsonl(tmp_path, tok, write_jsonl):
    rows = [{"prompt": "why is the sky blue", "chosen": " the sun", "rejected": " the moon"},
            {"prompt": "how big", "chosen": " very big", "rejected": " small", "id": 7}]
    data, report = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tok, config())
    assert (report.format, report.conversational, report.kind) == ("preference", False, "paired")
    assert decode(tok, data.prompt(0)) == "<s>why is the sky blue"
    assert decode(tok, data.completion(0, 0)) == " the sun</s>"
    assert decode(tok, data.completion(0, 1)) == " the moon</s>"
    assert data.example_index_n.tolist() == [0, 1]


def test_explicit_conversational_preference_uses_chat_template(tmp_path, tok):
    prompt = [chat("system", "be nice"), chat("user", "hi there")]
    rows = [{"prompt": prompt, "chosen": [chat("assistant", "hello")],
             "rejected": [chat("assistant", "go away")]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    data, report = prepare(str(path), tok, config())
    assert report.conversational
    whole = tok.apply_chat_template(prompt + rows[0]["chosen"], tokenize=False)
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert decode(tok, data.prompt(0)) == head == "<s><|system|>be nice<|end|><|user|>hi there" \
        "<|end|><|assistant|>"
    assert decode(tok, data.prompt(0)) + decode(tok, data.completion(0, 0)) == whole
    assert decode(tok, data.completion(0, 1)) == "go away<|end|>"


def test_implicit_prompt_text_hh_style(tmp_path, tok):
    head = "\n\nHuman: is it sunny\n\nAssistant: I think so\n\nHuman: and tomorrow\n\nAssistant:"
    rows = [{"chosen": head + " It will rain.", "rejected": head + " I don't know."},
            {"chosen": head + " Yes, sunny", "rejected": head + " Yes"}]
    path = tmp_path / "hh.json"
    path.write_text(json.dumps({"chosen": [r["chosen"] for r in rows],
                                "rejected": [r["rejected"] for r in rows]}))
    data, report = prepare(str(path), tok, config())
    assert report.format == "implicit_preference"
    # The prompt ends at the last shared word, never mid-word ("I" of "It" vs "I don't").
    assert decode(tok, data.prompt(0)) == "<s>" + head
    assert decode(tok, data.completion(0, 0)) == " It will rain.</s>"
    assert decode(tok, data.completion(0, 1)) == " I don't know.</s>"
    assert decode(tok, data.prompt(1)) == "<s>" + head
    assert decode(tok, data.completion(1, 1)) == " Yes</s>"


def test_implicit_prompt_conversational_hh_style(tmp_path, tok, write_jsonl):
    turns = [chat("user", "is it sunny"), chat("assistant", "I think so"),
             chat("user", "and tomorrow")]
    rows = [{"chosen": turns + [chat("assistant", "rain")],
             "rejected": turns + [chat("assistant", "no idea"), chat("user", "ok")]}]
    data, report = prepare(write_jsonl(tmp_path / "hh.jsonl", rows), tok, config())
    assert (report.format, report.conversational) == ("implicit_preference", True)
    assert decode(tok, data.prompt(0)) == tok.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=True)
    assert decode(tok, data.completion(0, 0)) == "rain<|end|>"
    assert decode(tok, data.completion(0, 1)) == "no idea<|end|><|user|>ok<|end|>"


def test_unpaired_from_parquet_carries_labels(tmp_path, tok, hf_cache):
    import datasets

    rows = [{"prompt": "say yes", "completion": " yes", "label": True},
            {"prompt": "say no", "completion": " yes", "label": False, }]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    data, report = prepare(str(tmp_path / "d.parquet"), tok, config())
    assert (report.format, report.kind, data.num_completions) == ("unpaired", "unpaired", 1)
    batch = Loader(data, 4, shuffle=False).next_batch()
    assert batch["label"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert batch["pair_valid"].tolist() == [1, 1, 0, 0]
    assert batch["source_index"].shape[0] == 4


def test_text_preference_from_csv_and_data_folder(tmp_path, tok, write_jsonl, hf_cache):
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no"} for i in range(5)]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", rows)
    for source in (tmp_path / "d.csv", tmp_path / "folder"):
        data, report = prepare(str(source), tok, config())
        assert (report.format, len(data)) == ("preference", 5)
        assert decode(tok, data.prompt(3)) == "<s>q3"


RANKED = [{"prompt": "pick", "completions": [" a", " b", " c", " d"],
           "scores": [1.0, 4.0, 2.0, 3.0]},
          {"prompt": "again", "completions": [" x", " y"], "scores": [0.5, 0.0]},
          {"prompt": "tied", "completions": [" x", " y"], "scores": [1.0, 1.0]}]


def ranked_pairs(data, tok):
    return [(data.example_index_n[i], decode(tok, data.completion(i, 0)),
             decode(tok, data.completion(i, 1))) for i in range(len(data))]


@pytest.mark.parametrize("mode,expected", [
    ("best_vs_worst", [(0, " b", " a"), (1, " x", " y")]),
    ("all_pairs", [(0, " b", " d"), (0, " b", " c"), (0, " b", " a"), (0, " d", " c"),
                   (0, " d", " a"), (0, " c", " a"), (1, " x", " y")]),
])
def test_ranked_to_pairs_from_saved_dataset(tmp_path, tok, hf_cache, mode, expected):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(RANKED)}).save_to_disk(
        str(tmp_path / "saved"))
    data, report = prepare(str(tmp_path / "saved"), tok, config(ranked=mode))
    assert report.format == "ranked" and report.counts["ranked_rows_all_tied"] == 1
    got = [(i, c[:-4], r[:-4]) for i, c, r in ranked_pairs(data, tok)]
    assert got == expected
    scores = dict(zip(" a b c d".split(" ")[1:], [1.0, 4.0, 2.0, 3.0]))
    assert data.fields["score_chosen"][0] == scores[expected[0][1].strip()]


def test_ranked_best_vs_random_is_seeded(tok, tmp_path, write_jsonl):
    rows = write_jsonl(tmp_path / "ranked.jsonl", RANKED[:1] * 40)
    first = ranked_pairs(prepare(rows, tok, config(ranked="best_vs_random"))[0], tok)
    again = ranked_pairs(prepare(rows, tok, config(ranked="best_vs_random"))[0], tok)
    other = ranked_pairs(prepare(rows, tok, config(ranked="best_vs_random", seed=1))[0], tok)
    assert first == again != other
    assert {c for _, c, _ in first} == {" b</s>"}
    assert {r for _, _, r in first} == {" a</s>", " c</s>", " d</s>"}


def test_ranked_listwise_keeps_lists_with_filler(tok, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "ranked.jsonl", RANKED[:2])
    data, report = prepare(path, tok, config(ranked="listwise"))
    assert (report.kind, data.num_completions) == ("listwise", 4)
    batch = Loader(data, 2, shuffle=False).next_batch()
    assert batch["source_index"].shape[0] == 8
    np.testing.assert_array_equal(batch["scores"][0], [1.0, 4.0, 2.0, 3.0])
    assert batch["scores"][1, :2].tolist() == [0.5, 0.0] and np.isnan(batch["scores"][1, 2:]).all()
    assert (batch["completion_mask"].sum(1)[4:] > 0).tolist() == [True, True, False, False]


def test_triple_with_gold_orders_chosen_rejected_gold(tok, tmp_path, write_jsonl):
    rows = [{"prompt": "q", "gold": " best", "chosen": " good", "rejected": " bad"}]
    data, report = prepare(write_jsonl(tmp_path / "tpo.jsonl", rows), tok, config())
    assert (report.format, report.kind, data.num_completions) == ("triple", "triple", 3)
    assert [decode(tok, data.completion(0, j)) for j in range(3)] == [
        " good</s>", " bad</s>", " best</s>"]


def test_optional_fields_carried_to_the_batch(tok, tmp_path, write_jsonl):
    rows = [{"prompt": "a", "chosen": " x", "rejected": " y", "score_chosen": 9, "weight": 0.5},
            {"prompt": "b", "chosen": " x", "rejected": " y", "margin": 2.0,
             "score_rejected": 1.5}]
    data, _ = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tok, config())
    batch = Loader(data, 3, shuffle=False).next_batch()
    assert batch["weight"].tolist() == [0.5, 1.0, 0.0]
    assert batch["margin"].tolist() == [0.0, 2.0, 0.0]
    assert batch["score_chosen"][0] == 9 and math.isnan(batch["score_chosen"][1])
    assert batch["score_rejected"][1] == 1.5 and math.isnan(batch["score_rejected"][0])
    assert batch["example_index"].tolist() == [0, 1, -1]


def test_ultrafeedback_style_text_prompt_beside_whole_conversations(tok, write_jsonl, tmp_path):
    """As in TRL, a prompt column of another style than chosen is ignored (implicit prompt)."""
    user = chat("user", "what colour is the sky")
    rows = [{"prompt": "what colour is the sky", "prompt_id": "x1",
             "chosen": [user, chat("assistant", "blue")],
             "rejected": [user, chat("assistant", "green")],
             "messages": [user, chat("assistant", "blue")],
             "score_chosen": 8.0, "score_rejected": 5.0}] * 2
    data, report = prepare(write_jsonl(tmp_path / "uf.jsonl", rows), tok, config())
    assert (report.format, report.conversational) == ("implicit_preference", True)
    assert decode(tok, data.prompt(0)) == tok.apply_chat_template(
        [user], tokenize=False, add_generation_prompt=True)
    assert decode(tok, data.completion(0, 1)) == "green<|end|>"
    assert data.fields["score_chosen"].tolist() == [8.0, 8.0]

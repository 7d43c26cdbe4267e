"""Transforms: label flipping at a rate, score-conditioned relabelling."""

import numpy as np
import pytest

from prefopt_jax.data import DataConfig, DataError, Loader, prepare


def rows_of(n):
    return [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}",
             "score_chosen": 2.0, "score_rejected": 1.0} for i in range(n)]


def text(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=True)


def test_flip_rate_is_seeded_and_swaps_sides_and_scores(tok):
    data, report = prepare(rows_of(300), tok, DataConfig(cache_dir=None, flip_rate=0.3))
    flipped = data.fields["flipped"].astype(bool)
    assert 60 <= flipped.sum() <= 120 and report.counts["labels_flipped"] == flipped.sum()
    for i in range(len(data)):
        chosen = text(tok, data.completion(i, 0))
        assert chosen.startswith(" bad" if flipped[i] else " good")
        assert data.fields["score_chosen"][i] == (1.0 if flipped[i] else 2.0)
    again, _ = prepare(rows_of(300), tok, DataConfig(cache_dir=None, flip_rate=0.3))
    other, _ = prepare(rows_of(300), tok, DataConfig(cache_dir=None, flip_rate=0.3, seed=5))
    np.testing.assert_array_equal(again.fields["flipped"], data.fields["flipped"])
    assert (other.fields["flipped"] != data.fields["flipped"]).any()
    assert Loader(data, 4).next_batch()["flipped"].shape == (4,)


def test_flips_do_not_depend_on_sharding(tok):
    cfg = DataConfig(cache_dir=None, flip_rate=0.5)
    whole, _ = prepare(rows_of(50), tok, cfg)
    halves = [prepare(rows_of(50), tok, cfg, process_index=h, process_count=2)[0]
              for h in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([h.fields["flipped"] for h in halves]), whole.fields["flipped"])


def test_flip_unpaired_negates_labels(tok):
    rows = [{"prompt": f"q{i}", "completion": " a", "label": True} for i in range(100)]
    data, _ = prepare(rows, tok, DataConfig(cache_dir=None, flip_rate=0.5))
    np.testing.assert_array_equal(data.fields["label"], 1.0 - data.fields["flipped"])


def test_score_conditioned_relabelling_text(tok):
    data, report = prepare(rows_of(2), tok, DataConfig(cache_dir=None, relabel_with_scores=True))
    assert len(data) == 4 and data.example_index_n.tolist() == [0, 0, 1, 1]
    assert text(tok, data.prompt(0)) == "q0\n\nWrite a response that would be rated 2."
    assert text(tok, data.prompt(1)) == "q0\n\nWrite a response that would be rated 1."
    assert text(tok, data.completion(0, 0)) == " good 0"
    assert text(tok, data.completion(1, 0)) == " bad 0"
    assert data.fields["score_chosen"].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert report.counts["relabelled_pairs"] == 4


def test_score_conditioned_relabelling_conversational(tok):
    rows = [{"prompt": [{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go"}],
             "score_chosen": 8, "score_rejected": 3}]
    data, _ = prepare(rows, tok, DataConfig(cache_dir=None, relabel_with_scores=True))
    prompt = tok.decode(list(data.prompt(1)))
    assert "<|system|>be brief\n\nWrite a response that would be rated 3.<|end|>" in prompt


def test_relabelling_needs_scores(tok):
    rows = rows_of(3)
    del rows[2]["score_rejected"]
    with pytest.raises(DataError, match="row 2, field 'score_rejected'"):
        prepare(rows, tok, DataConfig(cache_dir=None, relabel_with_scores=True))

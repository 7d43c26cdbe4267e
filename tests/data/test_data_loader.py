"""Loader: determinism for a seed, exact resumption, disjoint host slices covering the epoch."""

import json

import numpy as np
import pytest

from prefopt_jax.data import DataConfig, LayoutConfig, Loader, Shape, make_loader, prepare
from prefopt_jax.data.synthetic import synthetic_rows, synthetic_tokenized


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_packed"])
def test_same_seed_same_batches(layout):
    data = synthetic_tokenized(50, seed=0, max_length=256)
    first = take(Loader(data, 8, LayoutConfig(kind=layout), seed=3, num_epochs=None), 14)
    again = take(Loader(data, 8, LayoutConfig(kind=layout), seed=3, num_epochs=None), 14)
    other = take(Loader(data, 8, LayoutConfig(kind=layout), seed=4, num_epochs=None), 14)
    assert all(same(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a["example_index"], b["example_index"])
                   for a, b in zip(first, other))
    # Epochs are reshuffled: 50 examples in batches of 8 is 7 steps per epoch.
    assert first[0]["example_index"].tolist() != first[7]["example_index"].tolist()


def test_epoch_covers_every_example_once():
    data = synthetic_tokenized(50, seed=0, max_length=256)
    batches = list(Loader(data, 8, seed=1))
    seen = np.concatenate([b["example_index"][b["pair_valid"] > 0] for b in batches])
    assert len(batches) == 7 and sorted(seen.tolist()) == list(range(50))
    assert len(list(Loader(data, 8, drop_remainder=True))) == 6


@pytest.mark.parametrize("stop_at", [3, 7, 10])
def test_resume_yields_the_remaining_batches(stop_at):
    data = synthetic_tokenized(50, seed=0, max_length=256)
    layout = LayoutConfig(kind="packed")
    whole = take(Loader(data, 8, layout, seed=9, num_epochs=None), 16)
    first = Loader(data, 8, layout, seed=9, num_epochs=None)
    take(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Loader(data, 8, layout, seed=9, num_epochs=None)
    resumed.load_state_dict(state)
    rest = take(resumed, 16 - stop_at)
    assert all(same(a, b) for a, b in zip(whole[stop_at:], rest))


def test_resume_refuses_another_seed_or_epoch_length():
    data = synthetic_tokenized(50, seed=0, max_length=256)
    state = Loader(data, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="another seed or epoch length"):
        Loader(data, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="another seed or epoch length"):
        Loader(data.select(np.arange(40)), 8, seed=1).load_state_dict(state)


def test_two_hosts_see_disjoint_slices_covering_the_epoch(tok, tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_rows(37, "preference", seed=2))
    seen = []
    for host in range(2):
        loader, _ = make_loader(path, tok, DataConfig(cache_dir=None), batch_size=4,
                                layout=LayoutConfig(kind="prefix"), process_index=host,
                                process_count=2, steps_per_epoch=5, seed=0)
        batches = list(loader)
        assert len(batches) == 5
        seen.append({int(i) for b in batches for i in b["example_index"][b["pair_valid"] > 0]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(37))
    assert len(seen[0]) == 18 and len(seen[1]) == 19


def test_hosts_agree_on_a_shape_through_min_shape():
    small = Loader(synthetic_tokenized(16, seed=0, max_length=64), 8)
    large = Loader(synthetic_tokenized(16, seed=1, max_length=512), 8)
    agreed = Shape(*np.maximum(small.peek_shape(), large.peek_shape()))
    assert small.next_batch(agreed)["tokens"].shape == large.next_batch(agreed)["tokens"].shape



def test_peek_ahead_crosses_epochs():
    loader = Loader(synthetic_tokenized(16, seed=1, max_length=512), 6, num_epochs=None)
    ahead = [loader.peek_shape(n) for n in range(5)]
    assert loader.state_dict()["step"] == 0
    for shape in ahead:
        batch = loader.next_batch()
        assert batch["tokens"].shape + batch["source_index"].shape[1:] == tuple(shape)


def test_steps_per_epoch_pads_with_filler_batches():
    data = synthetic_tokenized(10, seed=0, max_length=64)
    batches = list(Loader(data, 4, steps_per_epoch=4))
    assert [int(b["pair_valid"].sum()) for b in batches] == [4, 4, 2, 0]
    assert batches[3]["completion_mask"].sum() == 0


def test_prepare_reads_only_its_slice(tok):
    rows = synthetic_rows(9, "preference")
    rows[1] = {"broken": True}
    # Host 1 of 3 owns rows 3..5, so the bad row 1 is never read there.
    data, report = prepare(rows, tok, DataConfig(cache_dir=None), process_index=1,
                           process_count=3)
    assert data.example_index_n.tolist() == [3, 4, 5] and report.counts["rows_read"] == 3


def test_loader_refuses_examples_that_fit_no_row():
    data = synthetic_tokenized(20, seed=0, max_length=512)
    with pytest.raises(ValueError, match="needs .* tokens, more than the packed row length 128"):
        Loader(data, 4, LayoutConfig(kind="packed", row_length=128))
    with pytest.raises(ValueError, match="more than the largest length bucket 64"):
        Loader(data, 4, LayoutConfig(length_buckets=(32, 64)))

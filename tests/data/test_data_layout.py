"""Layouts, checked without a model: what each target token can see under the mask contract."""

import dataclasses

import numpy as np
import pytest

from prefopt_jax.data import LAYOUTS, DataConfig, LayoutConfig, Shape, make_batch, prepare
from prefopt_jax.data.layout import (bucket, filled_runs, first_fit_decreasing, packed_runs,
                                     padding_fraction, prefix_runs, tight_row_length)
from prefopt_jax.data.synthetic import synthetic_rows, synthetic_tokenized
from prefopt_jax.data.tokenized import from_lists

KINDS = {"paired": ("preference", {}), "triple": ("triple", {}), "unpaired": ("unpaired", {}),
         "listwise": ("ranked", {"ranked": "listwise", "list_size": 5})}


@pytest.fixture(scope="module")
def datasets_by_kind(tok):
    out = {}
    for kind, (fmt, kw) in KINDS.items():
        rows = synthetic_rows(7, fmt, conversational=kind == "paired", seed=3)
        out[kind] = prepare(rows, tok, DataConfig(cache_dir=None, **kw))[0]
    return out


def visible(batch, flat_i):
    """(tokens, positions) that the position flat_i attends to, per docs/interfaces.md."""
    l = batch["tokens"].shape[1]
    r, i = divmod(int(flat_i), l)
    seg, branch = batch["segment_ids"][r], batch["branch_ids"][r]
    keys = [j for j in range(i + 1) if seg[j] == seg[i] and branch[j] in (0, branch[i])]
    return batch["tokens"][r, keys], batch["positions"][r, keys]


def check_batch(batch, data, idx):
    """Each target token is predicted from a context that is exactly prompt + completion[:t]."""
    k = data.num_completions
    for slot, i in enumerate(idx):
        for j in range(k):
            q, completion = slot * k + j, data.completion(i, j)
            assert batch["completion_mask"][q].sum() == len(completion)
            for t in range(len(completion)):
                tokens, positions = visible(batch, batch["source_index"][q, t])
                expect = np.concatenate([data.prompt(i), completion[:t]])
                np.testing.assert_array_equal(tokens, expect)
                np.testing.assert_array_equal(positions, np.arange(len(expect)))
                assert batch["target_tokens"][q, t] == completion[t]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_target_sees_its_prompt_and_prefix_only(datasets_by_kind, layout, kind):
    data = datasets_by_kind[kind]
    idx = np.array([4, 0, 6, 2, 5])
    batch = make_batch(data, idx, 6, LayoutConfig(kind=layout))
    check_batch(batch, data, idx)
    k = data.num_completions
    assert batch["source_index"].shape[0] == 6 * k and batch["pair_valid"].tolist() == [1] * 5 + [0]
    assert batch["example_index"].tolist() == data.example_index_n[idx].tolist() + [-1]
    assert batch["completion_mask"][5 * k:].sum() == 0
    for key in ("tokens", "positions", "segment_ids", "branch_ids", "source_index",
                "target_tokens"):
        assert batch[key].dtype == np.int32
    # Padding is segment 0 throughout.
    assert (batch["tokens"][batch["segment_ids"] == 0] == 0).all()


def test_packed_places_each_sequence_in_one_row_of_the_longest_sequence_bucket():
    data = synthetic_tokenized(64, seed=1, max_length=256, prompt_median=40, completion_median=60)
    idx = np.arange(64)
    batch = make_batch(data, idx, 64, LayoutConfig(kind="packed"))
    seq_nk = data.prompt_lengths_n[:, None] + data.completion_lengths_nk
    r, l = batch["tokens"].shape
    assert l == bucket(int(seq_nk.max()), None, "x") < bucket(int(seq_nk.sum(1).max()), None, "x")
    rows_qc = batch["source_index"] // l
    assert ((rows_qc == rows_qc[:, :1]) | (batch["completion_mask"] == 0)).all()
    # The sides of a pair are placed independently, so some land in different rows.
    assert (rows_qc[0::2, 0] != rows_qc[1::2, 0]).any()
    # First-fit decreasing of sequences: within its 11/9 OPT + 1 bound of a perfect fill.
    assert r <= 11 / 9 * -(-int(seq_nk.sum()) // l) + 1
    check_batch(batch, data, idx[:16])


def test_shapes_come_from_buckets():
    assert [bucket(n, None, "x") for n in (1, 16, 17, 100, 1024)] == [16, 16, 32, 128, 1024]
    assert bucket(70, (64, 96, 128), "x") == 96
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket(200, (64, 128), "sequence")
    data = synthetic_tokenized(40, seed=2, max_length=512)
    layout = LayoutConfig(kind="packed", row_length=1024, row_multiple=4)
    shapes = {make_batch(data, np.arange(s, s + 8), 8, layout)["tokens"].shape
              for s in range(0, 32, 8)}
    assert all(r % 4 == 0 and l == 1024 for r, l in shapes)
    padded = make_batch(data, np.arange(8), 8, LayoutConfig(length_buckets=(256, 512)))
    assert padded["tokens"].shape[1] in (256, 512) and padded["tokens"].shape[0] == 16


def test_min_shape_raises_the_shape():
    data = synthetic_tokenized(8, seed=2, max_length=128)
    batch = make_batch(data, np.arange(4), 4, LayoutConfig(), min_shape=Shape(10, 300, 200))
    assert batch["tokens"].shape == (10, 300) and batch["source_index"].shape == (8, 200)
    check_batch(batch, data, np.arange(4))


def test_packed_example_too_long_is_an_error():
    data = synthetic_tokenized(8, seed=2, max_length=512)
    with pytest.raises(ValueError, match="needs .* tokens, more than the packed row length 64"):
        make_batch(data, np.arange(8), 8, LayoutConfig(kind="packed", row_length=64))


def test_padding_fraction_ordering():
    data = synthetic_tokenized(256, seed=0, max_length=1024)
    fractions = {}
    for kind in LAYOUTS:
        batch = make_batch(data, np.arange(256), 256, LayoutConfig(kind=kind, row_length=2048))
        fractions[kind] = padding_fraction(batch)
    assert fractions["packed"] < 0.1 and fractions["prefix_packed"] < 0.1
    assert fractions["padded"] > fractions["packed"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_length_step_rows_keep_the_contract_and_hold_no_more_positions(datasets_by_kind, layout):
    data = datasets_by_kind["triple"]
    idx = np.array([4, 0, 6, 2, 5])
    coarse = make_batch(data, idx, 6, LayoutConfig(kind=layout))
    tight = make_batch(data, idx, 6, LayoutConfig(kind=layout, length_step=8))
    check_batch(tight, data, idx)
    length = tight["tokens"].shape[1]
    assert length % 8 == 0 or length == coarse["tokens"].shape[1]
    assert tight["tokens"].size <= coarse["tokens"].size
    assert (tight["segment_ids"] > 0).sum() == (coarse["segment_ids"] > 0).sum()
    if not LayoutConfig(kind=layout).packs:  # the longest row rounded up to 8, not to 2^n
        longest = int((tight["segment_ids"] > 0).sum(axis=1).max())
        assert tight["tokens"].shape[1] == -(-longest // 8) * 8


def pairs(prompt_lengths, completion_lengths):
    """TokenizedData of paired examples with the given prompt and (chosen, rejected) lengths."""
    prompts = [np.arange(1, n + 1) for n in prompt_lengths]
    completions = [np.arange(1, n + 1) for pair in completion_lengths for n in pair]
    return from_lists("paired", 2, prompts, completions, np.arange(len(prompts)), {})


def test_length_step_packs_rows_at_the_length_that_needs_fewest_positions():
    # Prefix-shared units of 300 and 285 tokens (and a longer one elsewhere in the data, which
    # sets the fixed row length to 512): two rows of 512, or two rows of 320 with a step of 64.
    data = pairs([100, 95, 200], [(100, 100), (95, 95), (200, 200)])
    fixed = make_batch(data, np.arange(2), 2, LayoutConfig(kind="prefix_packed", row_length=512))
    assert fixed["tokens"].shape == (2, 512)
    layout = LayoutConfig(kind="prefix_packed", row_length=512, length_step=64)
    tight = make_batch(data, np.arange(2), 2, layout)
    assert tight["tokens"].shape == (2, 320)
    check_batch(tight, data, np.arange(2))
    # Ties in positions go to the shorter rows: four units of 100 in 4 x 128 rather than 2 x 256.
    assert tight_row_length(np.array([100] * 4), 256, 64) == 128
    # Three units of 100 fit one row of 320 (against 3 x 128 = 384); with rows rounded up to a
    # multiple of 2 (the data-parallel devices) that is 2 x 320 = 640 against 4 x 128 = 512.
    assert tight_row_length(np.array([100] * 3), 384, 64) == 320
    assert tight_row_length(np.array([100] * 3), 384, 64, row_multiple=2) == 128
    assert tight_row_length(np.array([200, 50, 50, 150]), 512, 64) == 256
    # A unit longer than every candidate gets the limit, so placing it names the example.
    assert tight_row_length(np.array([700]), 512, 64) == 512
    with pytest.raises(ValueError, match="row 2 needs 600 tokens, more than the packed row length"):
        make_batch(data, np.arange(3), 3, layout)


def test_length_step_is_checked():
    with pytest.raises(ValueError, match="length_step must be a positive"):
        LayoutConfig(kind="packed", length_step=0)
    with pytest.raises(ValueError, match="length_step and length_buckets"):
        LayoutConfig(length_step=64, length_buckets=(128, 256))


def test_split_examples_cut_groups_between_completions_and_keep_the_contract():
    # Groups of 4 completions; a row of 40 holds a prompt of 6 and at most 2-3 completions, so
    # most examples are cut into runs, each a segment that starts with its own prompt copy.
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 16, (9, 4))
    lengths[0] = 0  # every completion empty: the prompt alone
    prompts = [np.arange(1, 7) + 10 * i for i in range(9)]
    completions = [np.arange(100, 100 + n) for n in lengths.reshape(-1)]
    data = from_lists("listwise", 4, prompts, completions, np.arange(9), {})
    idx = np.array([3, 0, 8, 2, 5, 7, 1, 6, 4])
    layout = LayoutConfig(kind="prefix_packed", row_length=40, split_examples=True)
    batch = make_batch(data, idx, 10, layout)
    check_batch(batch, data, idx)
    assert batch["tokens"].shape[1] == 40
    segments = sum(len(set(s[s > 0])) for s in batch["segment_ids"])
    runs = sum(len(prefix_runs(6, lengths[i], 40)[1]) for i in idx)
    assert segments == runs > len(idx)
    real = int((batch["segment_ids"] > 0).sum())
    assert real == 6 * runs + lengths.sum()
    # Whole examples do not fit rows of 40: without the split they are refused.
    with pytest.raises(ValueError, match="needs .* tokens, more than the packed row length 40"):
        make_batch(data, idx, 10, dataclasses.replace(layout, split_examples=False))
    # With length_step the rows take the multiple of 4 (up to 64) holding the fewest positions,
    # here shorter than 64; the runs are cut for that length and keep the contract.
    wide = dataclasses.replace(layout, row_length=64)
    fixed = make_batch(data, idx, 10, wide)
    stepped = make_batch(data, idx, 10, dataclasses.replace(wide, length_step=4))
    check_batch(stepped, data, idx)
    assert stepped["tokens"].shape[1] < 64 and stepped["tokens"].shape[1] % 4 == 0
    assert stepped["tokens"].size < fixed["tokens"].size
    # A batch with no examples (all slots padding) is rows of padding, as without the split.
    empty = make_batch(data, idx[:0], 2, layout)
    assert empty["tokens"].shape == (1, 40) and not empty["segment_ids"].any()


# Two groups of 3 in rows of 12 with prompts of 2: prefix_runs cuts the second group into runs
# of 8, 9 and 6 tokens, which with the first group's 9 need 4 rows (no two fit one row);
# filling rows in order, longest completion first, cuts it where the rows end: 3 rows.
FILL_LP, FILL_LC = np.array([2, 2]), np.array([[0, 0, 7], [6, 7, 4]])


def test_filled_runs_cut_examples_where_the_rows_end():
    unit_pk, need_u, row_u, offset_u, used = filled_runs(FILL_LP, FILL_LC, 12)
    assert unit_pk.tolist() == [[0, 0, 0], [2, 1, 2]]  # empty completions join the run
    assert need_u.tolist() == [9, 9, 12] and row_u.tolist() == [0, 1, 2]
    assert offset_u.tolist() == [0, 0, 0] and used == 3
    _, need, count = packed_runs(FILL_LP, FILL_LC, 12)
    assert need.tolist() == [9, 8, 9, 6] and count.tolist() == [1, 3]
    assert first_fit_decreasing(need, 12, need)[2] == 4
    # A run that starts mid-row sits after the row's earlier runs.
    unit_pk, need_u, row_u, offset_u, used = filled_runs(np.array([1, 1]),
                                                         np.array([[3, 2], [4, 0]]), 12)
    assert need_u.tolist() == [6, 5] and row_u.tolist() == [0, 0]
    assert offset_u.tolist() == [0, 6] and used == 1


def test_split_placement_takes_the_fewer_rows_and_keeps_the_contract():
    prompts = [np.arange(1, 3), np.arange(11, 13)]
    completions = [np.arange(100, 100 + n) for n in FILL_LC.reshape(-1)]
    data = from_lists("listwise", 3, prompts, completions, np.arange(2), {})
    idx = np.array([0, 1])
    batch = make_batch(data, idx, 2, LayoutConfig(kind="prefix_packed", row_length=12,
                                                  split_examples=True))
    check_batch(batch, data, idx)
    assert batch["tokens"].shape == (3, 12)
    assert sum(len(set(s[s > 0])) for s in batch["segment_ids"]) == 3  # a prompt copy per run
    assert int((batch["segment_ids"] > 0).sum()) == 2 * 3 + FILL_LC.sum()
    # Where first_fit_decreasing needs the fewer rows, its placement is kept: here the runs
    # 5 | 12 | 9 + 6 fill 3 rows first-fit decreasing and 4 in order (5, 8 + 4, 9, 6).
    lc = np.array([[3, 0], [6, 4], [7, 4]])
    assert filled_runs(np.full(3, 2), lc, 12)[-1] == 4
    data = from_lists("paired", 2, [np.arange(1, 3) + 10 * i for i in range(3)],
                      [np.arange(100, 100 + n) for n in lc.reshape(-1)], np.arange(3), {})
    batch = make_batch(data, np.arange(3), 3, LayoutConfig(kind="prefix_packed", row_length=12,
                                                           split_examples=True))
    check_batch(batch, data, np.arange(3))
    assert batch["tokens"].shape == (3, 12)


def test_prefix_runs_start_only_when_the_next_completion_does_not_fit():
    run_k, need = prefix_runs(5, np.array([10, 0, 30, 30, 3]), 40)
    assert run_k.tolist() == [0, 0, 1, 2, 2] and need == [15, 35, 38]
    # A completion that does not fit with the prompt makes a run longer than the row, which
    # placing refuses, naming the example.
    assert prefix_runs(5, np.array([50]), 40)[1] == [55]
    data = from_lists("paired", 2, [np.arange(1, 6)], [np.arange(1, 51), np.arange(1, 3)],
                      np.array([7]), {})
    with pytest.raises(ValueError, match="row 7 needs 55 tokens, more than the packed row"):
        make_batch(data, np.arange(1), 1, LayoutConfig(kind="prefix_packed", row_length=40,
                                                       split_examples=True))
    with pytest.raises(ValueError, match="split_examples is a prefix_packed option"):
        LayoutConfig(kind="packed", split_examples=True)

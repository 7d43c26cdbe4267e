"""Batch layouts: padded, packed (padding-free) and prefix-shared, all with bucketed static shapes.

Shape letters (as in docs/interfaces.md): `r` rows, `l` row length, `p` examples (pairs) per
batch, `k` completions per example, `q` = p * k completion sequences, `c` completion positions.

  padded         one sequence (prompt + one completion) per row, rows padded to a length bucket
  packed         each sequence (prompt + one completion) a segment; sequences packed into
                 fixed-length rows (first-fit decreasing); a sequence never straddles rows, the
                 sides of one example may sit in different rows
  prefix         one example per row: the prompt once (branch 0), then each completion
                 (branch j + 1, positions restarting at the prompt length)
  prefix_packed  prefix-shared examples packed into fixed-length rows as segments; with
                 `split_examples`, an example longer than the row is cut between completions,
                 each run of completions a segment with its own copy of the prompt

Every layout yields the same keys (the batch contract in docs/interfaces.md), so log-probs read
through source_index are layout-independent.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from prefopt_jax.data.tokenized import TokenizedData

LAYOUTS = ("padded", "packed", "prefix", "prefix_packed")
MIN_BUCKET = 16


class Shape(NamedTuple):
    """Static batch shape: rows, row length, completion positions (examples and K are fixed)."""

    rows: int
    length: int
    completion: int


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """How examples become rows.

    length_buckets: allowed row lengths for padded and prefix (None: powers of two from 16).
    row_length: the fixed row length for packed and prefix_packed (None: bucket of the longest
        example in the data). completion_buckets: allowed C (None: powers of two from 16).
    row_multiple: R is rounded up to a multiple (the data-parallel device count).
    length_step: finer shapes, fewer padding slots, more compiled shapes. Padded and prefix rows
        are the batch's longest row rounded up to a multiple of it (instead of a power of two);
        packed rows get a length per batch: of the multiples of it from the batch's longest unit
        up to row_length, the one whose rows hold the fewest positions (ties: the shorter rows,
        whose attention is cheaper). None: power-of-two buckets and fixed packed rows.
    split_examples: prefix_packed only. An example is cut between completions into runs that
        each fit `row_length` with a copy of the prompt (a run: the prompt, then as many of the
        following completions as fit), and the runs are packed as units; or, where that takes
        fewer rows, the rows are filled in order and an example is cut where a row ends
        (`split_placement`). Rows can then be shorter than an example (cheaper attention) and
        hold fewer padding positions, at the cost of one more prompt per extra run. Off: an
        example is one unit, which must fit.
    """

    kind: str = "padded"
    length_buckets: tuple[int, ...] | None = None
    row_length: int | None = None
    completion_buckets: tuple[int, ...] | None = None
    row_multiple: int = 1
    pad_id: int = 0
    length_step: int | None = None
    split_examples: bool = False

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"unknown layout {self.kind!r}; expected one of {LAYOUTS}")
        if self.split_examples and self.kind != "prefix_packed":
            raise ValueError(f"split_examples is a prefix_packed option, not {self.kind!r}'s")
        if self.length_step is not None:
            if self.length_step < 1:
                raise ValueError(f"length_step must be a positive number of positions, "
                                 f"got {self.length_step}")
            if self.length_buckets is not None:
                raise ValueError("length_step and length_buckets both set; give one of them")

    @property
    def shares_prefix(self) -> bool:
        """Whether each prompt is stored once for all its completions."""
        return self.kind.startswith("prefix")

    @property
    def packs(self) -> bool:
        """Whether several examples share a fixed-length row."""
        return self.kind in ("packed", "prefix_packed")


def bucket(n: int, buckets: tuple[int, ...] | None, what: str) -> int:
    """The smallest allowed size >= n."""
    if buckets is None:
        return max(MIN_BUCKET, 1 << max(int(n) - 1, 0).bit_length())
    fits = [b for b in sorted(buckets) if b >= n]
    if not fits:
        raise ValueError(f"{what} of {n} is longer than the largest bucket {max(buckets)}")
    return fits[0]


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple."""
    return -(-n // multiple) * multiple


def unit_lengths(lp_n: np.ndarray, lc_nk: np.ndarray, shares_prefix: bool) -> np.ndarray:
    """Tokens of each unit a packed row holds, `[N, K]`: prefix-shared, the whole example (prompt
    once, then every completion) in column 0; otherwise each sequence (prompt + completion j) in
    column j, 0 for an empty completion."""
    if shares_prefix:
        need_nk = np.zeros_like(lc_nk)
        need_nk[:, 0] = lp_n + lc_nk.sum(axis=1)
        return need_nk
    return np.where(lc_nk > 0, lp_n[:, None] + lc_nk, 0)


def prefix_runs(lp: int, lc_k: np.ndarray, length: int) -> tuple[np.ndarray, list[int]]:
    """An example's completions cut into runs that each fit `length` with a copy of the
    prompt: the run of each completion `[K]` (an empty one joins the current run) and each
    run's tokens. A run starts only when the next completion does not fit the current one, so
    a completion longer than `length - lp` makes a run that needs more than `length`."""
    run_k, need = np.zeros(len(lc_k), np.int64), [int(lp)]
    for j, n in enumerate(int(x) for x in lc_k):
        if n and need[-1] > lp and need[-1] + n > length:
            need.append(int(lp))
        need[-1] += n
        run_k[j] = len(need) - 1
    return run_k, need


def packed_runs(lp_p: np.ndarray, lc_pk: np.ndarray, length: int):
    """`prefix_runs` of every example as units: the unit of each completion `[P, K]`, each
    unit's tokens `[U]` and each example's count of units `[P]`."""
    runs = [prefix_runs(lp, lc_k, length) for lp, lc_k in zip(lp_p, lc_pk)]
    count_p = np.array([len(need) for _, need in runs], np.int64)
    first_p = np.cumsum(count_p) - count_p
    unit_pk = (first_p[:, None] + np.array([run_k for run_k, _ in runs], np.int64)
               ).reshape(lc_pk.shape)
    return unit_pk, np.array([n for _, need in runs for n in need], np.int64), count_p


def filled_runs(lp_p: np.ndarray, lc_pk: np.ndarray, length: int):
    """Rows of `length` filled in order, each example's completions longest first: a completion
    joins its example's run when it fits the row, else starts a run (with a copy of the prompt)
    in this row, or in a new row when that does not fit either; an empty completion joins the
    example's run. Returns the unit of each completion `[P, K]`, each unit's tokens, row and
    offset `[U]`, and the rows used (units are assumed to fit: `first_fit_decreasing` checks)."""
    unit_pk = np.zeros(lc_pk.shape, np.int64)
    need_u, row_u, offset_u = [], [], []
    row, free = -1, 0
    for i, (lp, lc_k) in enumerate(zip(lp_p, lc_pk)):
        unit = None
        for j in np.argsort(-lc_k, kind="stable"):
            n = int(lc_k[j])
            if unit is not None and n <= free:  # the example's run sits in the current row
                need_u[unit] += n
                free -= n
            else:
                if lp + n > free:
                    row, free = row + 1, length
                unit = len(need_u)
                need_u.append(int(lp) + n), row_u.append(row), offset_u.append(length - free)
                free -= int(lp) + n
            unit_pk[i, j] = unit
    return (unit_pk, np.array(need_u, np.int64), np.array(row_u, np.int64),
            np.array(offset_u, np.int64), row + 1)


def split_placement(lp_p: np.ndarray, lc_pk: np.ndarray, length: int, example_p: np.ndarray):
    """Examples cut into runs placed in rows of `length`, the fewer rows of two ways: the runs of
    `prefix_runs` packed first-fit decreasing, or rows filled in order (`filled_runs`), which
    cuts examples where the row ends and wins when the first way's runs leave gaps no other run
    fits. Returns the unit of each completion `[P, K]`, each unit's tokens, row and offset
    `[U]`, and the rows used. `example_p` names each example's dataset row in errors."""
    unit_pk, need_u, count_p = packed_runs(lp_p, lc_pk, length)
    row_u, offset_u, used = first_fit_decreasing(need_u, length, np.repeat(example_p, count_p))
    filled = filled_runs(lp_p, lc_pk, length)
    return filled if filled[-1] < used else (unit_pk, need_u, row_u, offset_u, used)


def default_row_length(data: TokenizedData, layout: LayoutConfig) -> int:
    """Row length for packing: the configured one, or the bucket of the longest unit."""
    if layout.row_length is not None:
        return layout.row_length
    need_nk = unit_lengths(data.prompt_lengths_n, data.completion_lengths_nk, layout.shares_prefix)
    return bucket(int(need_nk.max(initial=1)), None, "example")


def check_fits(data: TokenizedData, layout: LayoutConfig) -> None:
    """Raises, naming the first example row, if some example fits no row of the layout."""
    lp_n, lc_nk = data.prompt_lengths_n, data.completion_lengths_nk
    if layout.split_examples:
        need_n, limit, what = lp_n + lc_nk.max(axis=1, initial=0), layout.row_length, \
            "the packed row length"
    elif layout.packs:
        need_n, limit, what = unit_lengths(lp_n, lc_nk, layout.shares_prefix).max(axis=1), \
            layout.row_length, "the packed row length"
    elif layout.length_buckets is not None:
        need_n = lp_n + (lc_nk.sum(1) if layout.shares_prefix else lc_nk.max(1))
        limit, what = max(layout.length_buckets), "the largest length bucket"
    else:
        return
    if limit is not None and (need_n > limit).any():
        i = int(np.argmax(need_n > limit))
        raise ValueError(f"example from row {data.example_index_n[i]} needs {need_n[i]} tokens, "
                         f"more than {what} {limit}")


class Placement(NamedTuple):
    """Where each sequence of a batch goes: row and offset of example p's completion j (`[P, K]`;
    in prefix-shared layouts the offset of the segment that holds it, which starts with the
    prompt: the same for every j unless the example is split), and the batch shape."""

    row_pk: np.ndarray
    offset_pk: np.ndarray
    shape: Shape


def place(data: TokenizedData, idx_p: np.ndarray, num_slots: int,
          layout: LayoutConfig) -> Placement:
    """Assigns the examples idx_p (local positions) to rows; num_slots - len(idx_p) are filler."""
    k = data.num_completions
    lp_p, lc_pk = data.prompt_lengths_n[idx_p], data.completion_lengths_nk[idx_p]
    c = bucket(int(lc_pk.max(initial=1)), layout.completion_buckets, "completion")
    p = len(idx_p)
    if not layout.packs:
        rows_per = 1 if layout.shares_prefix else k
        longest = (lp_p + lc_pk.sum(1)) if layout.shares_prefix else (lp_p[:, None] + lc_pk)
        longest = int(longest.max(initial=1))
        length = (bucket(longest, layout.length_buckets, "sequence") if layout.length_step is None
                  else round_up(longest, layout.length_step))
        side_k = np.zeros(k, np.int64) if layout.shares_prefix else np.arange(k)
        row_pk = (np.arange(p) * rows_per)[:, None] + side_k[None]
        rows = round_up(num_slots * rows_per, layout.row_multiple)
        return Placement(row_pk, np.zeros((p, k), np.int64), Shape(rows, length, c))
    length = default_row_length(data, layout)
    if layout.split_examples:
        if layout.length_step is not None:  # the rows' length from the runs that fit `length`
            length = tight_row_length(packed_runs(lp_p, lc_pk, length)[1], length,
                                      layout.length_step, layout.row_multiple)
        unit_pk, _, row_u, offset_u, used = split_placement(lp_p, lc_pk, length,
                                                            data.example_index_n[idx_p])
        return Placement(row_u[unit_pk], offset_u[unit_pk],
                         Shape(round_up(max(used, 1), layout.row_multiple), length, c))
    need_pk = unit_lengths(lp_p, lc_pk, layout.shares_prefix)
    units = np.flatnonzero(need_pk.reshape(-1) > 0)
    need_u, example_u = need_pk.reshape(-1)[units], data.example_index_n[idx_p][units // k]
    unit_pk = np.full(p * k, -1, np.int64)
    unit_pk[units] = np.arange(len(units))
    unit_pk = unit_pk.reshape(p, k)
    if layout.shares_prefix:  # the whole example is the unit of column 0
        unit_pk = np.repeat(unit_pk[:, :1], k, axis=1)
    if layout.length_step is not None:
        length = tight_row_length(need_u, length, layout.length_step, layout.row_multiple)
    row_u, offset_u, used = first_fit_decreasing(need_u, length, example_u)
    row_pk = np.where(unit_pk >= 0, row_u[unit_pk], 0)
    offset_pk = np.where(unit_pk >= 0, offset_u[unit_pk], 0)
    rows = round_up(max(used, 1), layout.row_multiple)
    return Placement(row_pk, offset_pk, Shape(rows, length, c))


def tight_row_length(need_u: np.ndarray, limit: int, step: int, row_multiple: int = 1) -> int:
    """The packed row length, a multiple of `step` below `limit` or `limit` itself, whose
    first-fit-decreasing rows (rounded up to `row_multiple`) hold the fewest positions; ties go
    to the shorter rows. A unit longer than `limit` gets `limit` (placing it then raises)."""
    shortest = round_up(int(need_u.max(initial=1)), step)
    if shortest >= limit:
        return limit

    def positions(n: int) -> int:
        used = first_fit_decreasing(need_u, n, need_u)[2]
        return round_up(max(used, 1), row_multiple) * n

    return min([*range(shortest, limit, step), limit], key=lambda n: (positions(n), n))


def first_fit_decreasing(need_u: np.ndarray, length: int, example_u: np.ndarray):
    """Bin packing of units (examples or sequences) into rows of `length`; returns rows,
    offsets, rows used. `example_u` names each unit's dataset row in errors."""
    too_long = np.flatnonzero(need_u > length)
    if too_long.size:
        i = too_long[0]
        raise ValueError(f"example from row {example_u[i]} needs {need_u[i]} tokens, more than "
                         f"the packed row length {length}; raise row_length")
    free_r = np.full(len(need_u), length, np.int64)
    row_u, offset_u = np.zeros(len(need_u), np.int64), np.zeros(len(need_u), np.int64)
    for i in np.argsort(-need_u, kind="stable"):
        r = int(np.argmax(free_r >= need_u[i]))
        row_u[i], offset_u[i] = r, length - free_r[r]
        free_r[r] -= need_u[i]
    return row_u, offset_u, int((free_r < length).sum())


def empty_batch(shape: Shape, num_slots: int, k: int, pad_id: int) -> dict:
    """All-padding arrays of a batch shape; filler everywhere until examples are written."""
    r, l, c = shape
    q = num_slots * k
    return {
        "tokens": np.full((r, l), pad_id, np.int32),
        "positions": np.zeros((r, l), np.int32),
        "segment_ids": np.zeros((r, l), np.int32),
        "branch_ids": np.zeros((r, l), np.int32),
        "source_index": np.zeros((q, c), np.int32),
        "target_tokens": np.zeros((q, c), np.int32),
        "completion_mask": np.zeros((q, c), np.float32),
    }


def write_example(batch: dict, data: TokenizedData, i: int, slot: int, row_k: np.ndarray,
                  offset_k: np.ndarray, layout: LayoutConfig, segments_r: np.ndarray) -> None:
    """Writes example i (local position) into batch slot `slot` at its rows and offsets."""
    if layout.shares_prefix:
        write_shared(batch, data, i, slot, row_k, offset_k, segments_r)
    else:
        write_separate(batch, data, i, slot, row_k, offset_k, segments_r)


def write_shared(batch: dict, data: TokenizedData, i: int, slot: int, row_k: np.ndarray,
                 offset_k: np.ndarray, segments_r: np.ndarray) -> None:
    """A segment per distinct (row, offset) of the completions (one unless the example is
    split): the prompt (branch 0), then each of its completions j as branch j + 1."""
    k, prompt = data.num_completions, data.prompt(i)
    lp = len(prompt)
    cursors = {}
    for j in range(k):
        row, offset = int(row_k[j]), int(offset_k[j])
        if (row, offset) not in cursors:
            segments_r[row] += 1
            cursors[row, offset] = fill(batch, row, offset, prompt, 0, segments_r[row], 0)
        completion = data.completion(i, j)
        if len(completion):
            start = cursors[row, offset]
            cursors[row, offset] = fill(batch, row, start, completion, lp, segments_r[row], j + 1)
            # The first token is predicted from the last prompt token, which may sit before
            # other branches; positions restart at lp so RoPE sees an unshared sequence.
            set_targets(batch, slot * k + j, row, start, offset + lp - 1, completion)


def write_separate(batch: dict, data: TokenizedData, i: int, slot: int, row_k: np.ndarray,
                   offset_k: np.ndarray, segments_r: np.ndarray) -> None:
    """One segment per completion j, with its own copy of the prompt, at row_k[j], offset_k[j]."""
    k, prompt = data.num_completions, data.prompt(i)
    for j in range(k):
        completion = data.completion(i, j)
        if not len(completion):
            continue
        r = int(row_k[j])
        segments_r[r] += 1
        start = fill(batch, r, int(offset_k[j]), prompt, 0, segments_r[r], 0)
        fill(batch, r, start, completion, len(prompt), segments_r[r], 0)
        set_targets(batch, slot * k + j, r, start, start - 1, completion)


def fill(batch: dict, row: int, start: int, tokens: np.ndarray, first_position: int,
         segment: int, branch: int) -> int:
    """Writes tokens at [start, start + n) of a row; returns the end."""
    end = start + len(tokens)
    batch["tokens"][row, start:end] = tokens
    batch["positions"][row, start:end] = np.arange(first_position, first_position + len(tokens))
    batch["segment_ids"][row, start:end] = segment
    batch["branch_ids"][row, start:end] = branch
    return end


def set_targets(batch: dict, q: int, row: int, start: int, first_source: int,
                completion: np.ndarray) -> None:
    """Completion q's targets, mask, and the flat positions whose outputs predict them."""
    lc, l = len(completion), batch["tokens"].shape[1]
    source = np.arange(start - 1, start - 1 + lc)
    source[0] = first_source
    batch["source_index"][q, :lc] = row * l + source
    batch["target_tokens"][q, :lc] = completion
    batch["completion_mask"][q, :lc] = 1.0


def example_fields(data: TokenizedData, idx_p: np.ndarray, num_slots: int) -> dict:
    """Per-example arrays [P] (scores: [P, K]); filler slots get pair_valid 0 and weight 0."""
    n = len(idx_p)
    out = {"pair_valid": np.zeros(num_slots, np.float32),
           "example_index": np.full(num_slots, -1, np.int32)}
    out["pair_valid"][:n] = 1.0
    out["example_index"][:n] = data.example_index_n[idx_p]
    names = ["weight", "margin", "score_chosen", "score_rejected"]
    names += sorted(set(data.fields) - set(names))
    for name in names:
        values = data.field(name)[idx_p]
        filler = 0.0 if name in ("weight", "margin", "label", "flipped") else np.nan
        out[name] = np.full((num_slots,) + values.shape[1:], filler, np.float32)
        out[name][:n] = values
    return out


def make_batch(data: TokenizedData, idx_p: np.ndarray, num_slots: int, layout: LayoutConfig,
               min_shape: Shape | None = None, placement: Placement | None = None) -> dict:
    """A numpy batch (docs/interfaces.md) of examples idx_p, padded with filler to num_slots.

    min_shape raises the bucketed shape (so that several hosts can agree on one shape).
    """
    idx_p = np.asarray(idx_p, np.int64)
    if len(idx_p) > num_slots:
        raise ValueError(f"{len(idx_p)} examples for {num_slots} slots")
    placement = placement or place(data, idx_p, num_slots, layout)
    shape = placement.shape
    if min_shape is not None:
        shape = Shape(*(max(a, b) for a, b in zip(shape, min_shape)))
    batch = empty_batch(shape, num_slots, data.num_completions, layout.pad_id)
    segments_r = np.zeros(shape.rows, np.int32)
    for slot, i in enumerate(idx_p):
        write_example(batch, data, int(i), slot, placement.row_pk[slot],
                      placement.offset_pk[slot], layout, segments_r)
    batch.update(example_fields(data, idx_p, num_slots))
    return batch


def padding_fraction(batch: dict) -> float:
    """Fraction of the [R, L] token slots that hold padding."""
    return float((batch["segment_ids"] == 0).mean())

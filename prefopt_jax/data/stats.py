"""Figures about tokenised data: length histograms and what each layout costs in padding.

Used by `prefopt data inspect` and benchmarks/layouts.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from prefopt_jax.data.layout import LayoutConfig
from prefopt_jax.data.loader import Loader
from prefopt_jax.data.tokenized import TokenizedData, side_names

BAR = 40


def length_summary(lengths: np.ndarray) -> dict:
    """min, median, p90, p99, max and mean of a length array."""
    q = np.percentile(lengths, [0, 50, 90, 99, 100]) if len(lengths) else [0] * 5
    return {"min": int(q[0]), "median": int(q[1]), "p90": int(q[2]), "p99": int(q[3]),
            "max": int(q[4]), "mean": float(np.mean(lengths)) if len(lengths) else 0.0}


def histogram_lines(lengths: np.ndarray) -> list[str]:
    """A text histogram over power-of-two bins."""
    lengths = np.asarray(lengths)
    if not len(lengths):
        return ["  (empty)"]
    top = max(int(lengths.max()), 1)
    edges = [0] + [1 << e for e in range(top.bit_length() + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    scale = BAR / max(counts.max(), 1)
    return [f"  [{lo:>6}, {hi:>6})  {n:>7}  {'#' * int(round(n * scale))}"
            for lo, hi, n in zip(edges[:-1], edges[1:], counts) if n]


def field_lengths(data: TokenizedData) -> dict:
    """Token lengths per field: prompt, each completion side, and the longest full sequence."""
    out = {"prompt": data.prompt_lengths_n}
    lc_nk = data.completion_lengths_nk
    for j, name in enumerate(side_names(data.kind, data.num_completions)):
        real = lc_nk[:, j] > 0
        out[name] = lc_nk[real, j]
    out["prompt + longest completion"] = data.prompt_lengths_n + lc_nk.max(axis=1)
    return out


@dataclasses.dataclass
class LayoutFigures:
    """What an epoch costs in one layout."""

    layout: str
    padding_fraction: float
    tokens_per_row: float
    rows_per_batch: float
    row_length: float
    tokens_per_batch: float
    slots_per_batch: float
    shapes: int


def layout_figures(data: TokenizedData, batch_size: int, layout: LayoutConfig,
                   max_batches: int | None = None) -> LayoutFigures:
    """Padding fraction, real tokens per row and distinct shapes over an epoch (or a prefix).

    slots_per_batch (R * L) is what the step computes on; tokens_per_batch is how much of it is
    real (prefix sharing lowers it by storing each prompt once).
    """
    loader = Loader(data, batch_size, layout, seed=0)
    real = slots = rows = 0
    shapes = set()
    for step, batch in enumerate(loader):
        if max_batches is not None and step >= max_batches:
            break
        r, l = batch["tokens"].shape
        real += int((batch["segment_ids"] > 0).sum())
        slots, rows = slots + r * l, rows + r
        shapes.add((r, l, batch["source_index"].shape[1]))
    batches = min(loader.steps_per_epoch, max_batches or loader.steps_per_epoch)
    return LayoutFigures(layout.kind, 1 - real / slots, real / rows, rows / batches,
                         slots / rows, real / batches, slots / batches, len(shapes))

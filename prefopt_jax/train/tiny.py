"""The `tiny` switch: a small random model (`models.presets.TINY`) and synthetic preference
batches for smoke runs and tests.

Shape letters: `r` rows, `l` row length, `q` sequences, `c` completion positions, `p` pairs.

Batches follow the contract of docs/interfaces.md for the three layouts (padded, packed,
prefix-shared), built directly from token lists, so tests and `--gin.tiny=True` runs need no
tokenizer, no files and no data pipeline.
"""

from __future__ import annotations

import numpy as np

from prefopt_jax.models.presets import TINY as CONFIG
from prefopt_jax.models.presets import TINY_VOCAB as VOCAB
from prefopt_jax.models.presets import tiny_config as config

__all__ = ["CONFIG", "VOCAB", "batch", "config", "layout_packed", "layout_padded",
           "layout_prefix", "pairs"]


def pairs(n: int, seed: int, max_prompt: int = 6, max_completion: int = 7):
    """`n` random (prompt, chosen, rejected) token lists with long-tailed-ish lengths."""
    rng = np.random.default_rng(seed)
    draw = lambda hi: list(rng.integers(1, VOCAB, int(rng.integers(1, hi + 1))))  # noqa: E731
    return [(draw(max_prompt), draw(max_completion), draw(max_completion)) for _ in range(n)]


def _empty(rows: int, length: int, q: int, c: int) -> dict:
    i32 = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    return {"tokens": i32(rows, length), "positions": i32(rows, length),
            "segment_ids": i32(rows, length), "branch_ids": i32(rows, length),
            "source_index": i32(q, c), "target_tokens": i32(q, c),
            "completion_mask": np.zeros((q, c), np.float32)}


def _put(b, row, start, tokens, pos0, seg, branch, length):
    """Writes a run of tokens into a row; returns the flat indices of its rows."""
    n = len(tokens)
    b["tokens"][row, start:start + n] = tokens
    b["positions"][row, start:start + n] = np.arange(pos0, pos0 + n)
    b["segment_ids"][row, start:start + n] = seg
    b["branch_ids"][row, start:start + n] = branch
    return row * length + np.arange(start, start + n)


def _completion(b, q, flat_prompt_last, flat_completion, completion):
    """Source of token c is the row before it: the prompt's last token, then the completion's."""
    n = len(completion)
    b["source_index"][q, :n] = np.concatenate([[flat_prompt_last], flat_completion[:-1]])
    b["target_tokens"][q, :n] = completion
    b["completion_mask"][q, :n] = 1.0


def layout_padded(data, length: int, c: int) -> dict:
    """One sequence per row."""
    b = _empty(2 * len(data), length, 2 * len(data), c)
    for p, (prompt, *sides) in enumerate(data):
        for s, comp in enumerate(sides):
            q = 2 * p + s
            flat = _put(b, q, 0, prompt + comp, 0, 1, 0, length)
            _completion(b, q, flat[len(prompt) - 1], flat[len(prompt):], comp)
    return b


def layout_packed(data, length: int, c: int, rows: int) -> dict:
    """Sequences packed greedily into rows, one segment each."""
    b = _empty(rows, length, 2 * len(data), c)
    row, start, seg = 0, 0, 1
    for p, (prompt, *sides) in enumerate(data):
        for s, comp in enumerate(sides):
            seq = prompt + comp
            if start + len(seq) > length:
                row, start, seg = row + 1, 0, 1
            flat = _put(b, row, start, seq, 0, seg, 0, length)
            _completion(b, 2 * p + s, flat[len(prompt) - 1], flat[len(prompt):], comp)
            start, seg = start + len(seq), seg + 1
    if row >= rows:
        raise ValueError(f"packing needs {row + 1} rows, have {rows}")
    return b


def layout_prefix(data, length: int, c: int) -> dict:
    """One row per pair: the prompt once (branch 0), then each completion in its own branch."""
    b = _empty(len(data), length, 2 * len(data), c)
    for p, (prompt, *sides) in enumerate(data):
        flat_prompt = _put(b, p, 0, prompt, 0, 1, 0, length)
        start = len(prompt)
        for s, comp in enumerate(sides):
            flat = _put(b, p, start, comp, len(prompt), 1, s + 1, length)
            _completion(b, 2 * p + s, flat_prompt[-1], flat, comp)
            start += len(comp)
    return b


def batch(layout: str, seed: int = 0, n_pairs: int = 4, valid: int | None = None,
          rows: int | None = None, unpaired: bool = False) -> dict:
    """A synthetic batch in one of the three layouts (numpy, static shapes).

    `unpaired=True` reads each sequence as its own labelled example (`Q = P`, KTO/BCO data).
    """
    data = pairs(n_pairs, seed)
    c = 7
    builders = {"padded": lambda: layout_padded(data, 6 + c, c),
                "packed": lambda: layout_packed(data, 26, c, rows or max(1, n_pairs)),
                "prefix": lambda: layout_prefix(data, 6 + 2 * c, c)}
    b = builders[layout]()
    n = 2 * n_pairs if unpaired else n_pairs
    valid = n if valid is None else valid
    b["pair_valid"] = (np.arange(n) < valid).astype(np.float32)
    b["example_index"] = np.where(np.arange(n) < valid, np.arange(n) + seed * 1000,
                                  -1).astype(np.int32)
    if unpaired:
        b["label"] = (np.arange(n) % 2 == 0).astype(np.int32)
    return b

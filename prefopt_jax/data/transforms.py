"""Transforms for studies: label flipping, score-conditioned relabelling, length filtering.

Each transform is a pure function of the records and a seed; random choices come from a hash of
(seed, row index, position within the row), so they do not depend on how rows are sharded.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from prefopt_jax.data.formats import DataError, Record

DEFAULT_SCORE_TEMPLATE = "{prompt}\n\nWrite a response that would be rated {score:g}."
DEFAULT_SYSTEM_TEMPLATE = "Write a response that would be rated {score:g}."


def hashed_uniform(seed: int, keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers from a splitmix64 hash of (seed, key); vectorised and stateless."""
    x = keys.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def record_keys(records: list[Record]) -> np.ndarray:
    """A key per record: its row index and its position among the records of that row."""
    seen = Counter()
    keys = np.empty(len(records), np.uint64)
    for i, record in enumerate(records):
        keys[i] = (record.index << 16) + seen[record.index]
        seen[record.index] += 1
    return keys


def flip_labels(records: list[Record], rate: float, seed: int, kind: str) -> list[Record]:
    """Swaps chosen and rejected (or negates an unpaired label) for a `rate` fraction of records.

    Every record gets a `flipped` field (0 or 1) so that studies can tell noisy pairs apart.
    """
    if kind == "listwise":
        raise ValueError("label flipping applies to paired, triple and unpaired data, not listwise")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"flip rate must be in [0, 1], got {rate}")
    flip = hashed_uniform(seed, record_keys(records)) < rate
    out = []
    for record, do_flip in zip(records, flip):
        fields = dict(record.fields, flipped=float(do_flip))
        completions = list(record.completions)
        if do_flip and kind == "unpaired":
            fields["label"] = 1.0 - fields["label"]
        elif do_flip:
            completions[0], completions[1] = completions[1], completions[0]
            swap_scores(fields)
        out.append(dataclasses.replace(record, completions=completions, fields=fields))
    return out


def swap_scores(fields: dict) -> None:
    """Swaps the chosen and rejected sides' scores and win probabilities in place (any of them
    may be absent)."""
    for a, b in (("score_chosen", "score_rejected"), ("win_prob_chosen", "win_prob_rejected")):
        chosen, rejected = fields.pop(a, None), fields.pop(b, None)
        if rejected is not None:
            fields[a] = rejected
        if chosen is not None:
            fields[b] = chosen


def condition_prompt(prompt, score: float, template: str, system_template: str):
    """The prompt asking for a response of the given score (text: template; chat: system turn)."""
    if isinstance(prompt, str):
        return template.format(prompt=prompt, score=score)
    note = system_template.format(score=score)
    if prompt and prompt[0]["role"] == "system":
        first = dict(prompt[0], content=f"{prompt[0]['content']}\n\n{note}")
        return [first, *prompt[1:]]
    return [{"role": "system", "content": note}, *prompt]


def relabel_with_scores(records: list[Record], kind: str,
                        template: str = DEFAULT_SCORE_TEMPLATE,
                        system_template: str = DEFAULT_SYSTEM_TEMPLATE) -> list[Record]:
    """Reward-augmented data: each scored pair becomes two pairs, prompts conditioned on a score.

    (x, y_w, y_l) with scores (r_w, r_l) gives (x | r_w, y_w, y_l) and (x | r_l, y_l, y_w): the
    response that matches the asked-for score is the one preferred.
    """
    if kind != "paired":
        raise ValueError(f"score-conditioned relabelling needs paired data, got {kind}")
    out = []
    for record in records:
        for field in ("score_chosen", "score_rejected"):
            if field not in record.fields:
                raise DataError(record.index, field, "missing field: score-conditioned "
                                "relabelling needs score_chosen and score_rejected")
        high, low = record.fields["score_chosen"], record.fields["score_rejected"]
        for score, other, completions in ((high, low, record.completions),
                                          (low, high, record.completions[::-1])):
            fields = dict(record.fields, score_chosen=score, score_rejected=other)
            prompt = condition_prompt(record.prompt, score, template, system_template)
            out.append(Record(record.index, prompt, list(completions), fields))
    return out


def filter_by_length(data, report, min_length: int | None = None,
                     max_length: int | None = None):
    """Keeps examples whose longest sequence (prompt + a completion) is within [min, max]."""
    longest_n = data.prompt_lengths_n + data.completion_lengths_nk.max(axis=1)
    keep_n = np.ones(len(data), bool)
    if min_length is not None:
        report.counts["filtered_shorter_than_min"] += int((longest_n < min_length).sum())
        keep_n &= longest_n >= min_length
    if max_length is not None:
        report.counts["filtered_longer_than_max"] += int((longest_n > max_length).sum())
        keep_n &= longest_n <= max_length
    return data if keep_n.all() else data.select(np.flatnonzero(keep_n))

"""Preference-data formats: detection, validation and normalisation of raw rows into records.

The column conventions are TRL's, so a dataset moves between the two unchanged:

  preference           prompt, chosen, rejected
  implicit_preference  chosen, rejected      (whole conversations; the shared prefix is the prompt)
  unpaired             prompt, completion, label (bool)               (KTO, BCO)
  ranked               prompt, completions (list), scores (list)      (to pairs, or kept listwise)
  triple               prompt, gold, chosen, rejected                 (TPO)

Every text field is either plain text or a conversational list of {"role", "content"} messages;
a dataset is one or the other throughout (a prompt column of another style than chosen is
ignored, as TRL does, and the prompt is implicit). Paired rows may carry score_chosen, score_rejected,
margin, weight and win_prob_chosen / win_prob_rejected (SPPO, DNO: each completion's win
probability against the previous iterate); the others may carry weight.

A `Record` is the normalised row: one prompt and K completions in a fixed order per kind
(paired: chosen, rejected; unpaired: the completion; triple: chosen, rejected, gold; listwise:
the completions, padded to K with None). Bad rows raise `DataError` naming the row and field,
or are skipped and counted when asked (never dropped silently).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from prefopt_jax.data.report import DataReport
from prefopt_jax.errors import UserError

FORMATS = {
    "triple": ("prompt", "gold", "chosen", "rejected"),
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_preference": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "ranked": ("prompt", "completions", "scores"),
}
PAIR_FIELDS = ("score_chosen", "score_rejected", "margin", "weight", "win_prob_chosen",
               "win_prob_rejected")
OPTIONAL_FIELDS = {
    "triple": PAIR_FIELDS, "preference": PAIR_FIELDS, "implicit_preference": PAIR_FIELDS,
    "unpaired": ("weight",), "ranked": ("weight",),
}
KIND_OF_FORMAT = {
    "triple": "triple", "preference": "paired", "implicit_preference": "paired",
    "unpaired": "unpaired", "ranked": "paired",
}
RANKED_MODES = ("best_vs_worst", "all_pairs", "best_vs_random", "listwise")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
DETECT_ROWS = 256


class DataError(UserError, ValueError):
    """A bad input row: names the row index (in the whole source) and the field."""

    def __init__(self, row: int, field: str | None, reason: str, where: str | None = None):
        self.row, self.field, self.reason = row, field, reason
        where = (where or f"row {row}") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {reason}")

    def located(self, source) -> DataError:
        """The same error naming the source and where the row is in it (a file's line)."""
        return DataError(self.row, self.field, self.reason, where=source.location(self.row))


@dataclasses.dataclass
class Record:
    """One normalised example: a prompt, K completions (None = filler) and per-example fields."""

    index: int
    prompt: Any
    completions: list
    fields: dict = dataclasses.field(default_factory=dict)


def present(row: dict, field: str) -> bool:
    """Whether a row has a value for field (Arrow fills absent columns with None)."""
    return row.get(field) is not None


def redundant_prompt(row: dict) -> bool:
    """Whether a row's prompt has another style than chosen (text vs messages).

    TRL ignores such a prompt column and takes the prompt from the shared prefix of chosen and
    rejected (UltraFeedback-binarised rows look like this); so do we.
    """
    prompt, chosen = row.get("prompt"), row.get("chosen")
    return ((isinstance(prompt, str) and isinstance(chosen, (list, tuple)))
            or (isinstance(prompt, (list, tuple)) and isinstance(chosen, str)))


def row_format(row: dict) -> str | None:
    """The format a row follows on its own, or None."""
    for name, fields in FORMATS.items():
        if all(present(row, f) for f in fields):
            return "implicit_preference" if name == "preference" and redundant_prompt(row) \
                else name
    return None


def detect_format(rows: Sequence[dict]) -> str:
    """Names the format most of the given rows follow (ties go to the richer format)."""
    votes = Counter(row_format(row) for row in rows[:DETECT_ROWS] if isinstance(row, dict))
    votes.pop(None, None)
    if not votes:
        columns = sorted(rows[0]) if rows and isinstance(rows[0], dict) else []
        known = "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items())
        raise DataError(0, None, f"no known format in columns {columns}; expected {known}")
    order = list(FORMATS)
    return max(votes, key=lambda name: (votes[name], -order.index(name)))


def detect_conversational(rows: Sequence[dict], fmt: str) -> bool:
    """Whether most rows hold message lists rather than plain text in the format's text fields."""
    field = "chosen" if fmt == "implicit_preference" else "prompt"
    styles = [isinstance(row.get(field), (list, tuple)) for row in rows[:DETECT_ROWS]
              if present(row, field)]
    return sum(styles) * 2 > len(styles)


def check_format(row: dict, index: int, fmt: str) -> None:
    """Raises if a row lacks a field of fmt or follows another format."""
    own = row_format(row)
    if own == fmt:
        return
    missing = [f for f in FORMATS[fmt] if not present(row, f)]
    if own is None:
        raise DataError(index, missing[0], f"missing field (format '{fmt}' needs "
                        f"{', '.join(FORMATS[fmt])})")
    # Name what makes the row differ: a field it lacks, one it has extra, or the prompt (a
    # prompt column of another style than chosen is what makes a row implicit).
    extra = [f for f in FORMATS[own] if f not in FORMATS[fmt]]
    field = (missing or extra or ["prompt"])[0]
    raise DataError(index, field, f"mixed formats: the dataset is '{fmt}' "
                    f"({', '.join(FORMATS[fmt])}) but this row is '{own}' "
                    f"({', '.join(FORMATS[own])})")


def check_text(value: Any, index: int, field: str, conversational: bool,
               completion: bool) -> Any:
    """Validates one text field; returns it as a str or a list of message dicts."""
    if isinstance(value, str):
        if conversational:
            raise DataError(index, field, "mixed formats: plain text in a conversational "
                            "dataset")
        if not value.strip():
            raise DataError(index, field, "empty completion" if completion else "empty prompt")
        return value
    if not isinstance(value, (list, tuple)):
        raise DataError(index, field, f"wrong type: expected a string or a list of "
                        f"{{'role', 'content'}} messages, got {type(value).__name__}")
    if not conversational:
        raise DataError(index, field, "mixed formats: a message list in a plain-text dataset")
    messages = [check_message(m, index, f"{field}[{i}]") for i, m in enumerate(value)]
    if not any(m["content"].strip() for m in messages):
        raise DataError(index, field, "empty completion" if completion else "empty prompt")
    return messages


def check_message(message: Any, index: int, field: str) -> dict:
    """Validates one chat message; drops keys Arrow filled with None."""
    if not isinstance(message, dict):
        raise DataError(index, field, f"wrong type: a message must be a dict, got "
                        f"{type(message).__name__}")
    for key in ("role", "content"):
        if not isinstance(message.get(key), str):
            got = type(message.get(key)).__name__
            raise DataError(index, f"{field}.{key}", f"wrong type: expected str, got {got}")
    if message["role"] not in ROLES:
        raise DataError(index, f"{field}.role", f"unknown role '{message['role']}' "
                        f"(known: {', '.join(sorted(ROLES))})")
    return {k: v for k, v in message.items() if v is not None}


def check_number(value: Any, index: int, field: str) -> float:
    """Validates a finite real number (bools are refused: they are labels, not scores)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise DataError(index, field, f"wrong type: expected a number, got "
                        f"{type(value).__name__}")
    if not math.isfinite(float(value)):
        raise DataError(index, field, f"not a finite number: {value}")
    return float(value)


def check_label(value: Any, index: int) -> float:
    """Validates an unpaired label: a bool (or 0/1, which CSV readers produce)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer))
                                                and value in (0, 1)):
        return float(bool(value))
    raise DataError(index, "label", f"wrong type: expected a bool, got "
                    f"{type(value).__name__} {value!r}")


def optional_fields(row: dict, index: int, fmt: str) -> dict:
    """The per-example numeric fields present in a row, validated."""
    out = {f: check_number(row[f], index, f) for f in OPTIONAL_FIELDS[fmt] if present(row, f)}
    if out.get("weight", 0.0) < 0:
        raise DataError(index, "weight", f"negative weight {out['weight']}")
    return out


def split_shared_prefix(chosen: Any, rejected: Any, index: int) -> tuple[Any, Any, Any]:
    """Splits two whole conversations into (shared prompt, chosen rest, rejected rest)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and 0 < n:
        # Cut at a word boundary, and hand the separating whitespace to the completions,
        # so "Assistant: I" + "t is" never happens and the prompt ends like TRL's.
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
        while n > 0 and chosen[n - 1].isspace():
            n -= 1
    if n == 0:
        raise DataError(index, "chosen", "no shared prompt: chosen and rejected differ from "
                        "the start")
    return chosen[:n], chosen[n:], rejected[n:]


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """How rows are read: the format, text style, ranked-list handling and list size."""

    format: str
    conversational: bool
    ranked: str = "best_vs_worst"
    list_size: int | None = None
    seed: int = 0

    @property
    def kind(self) -> str:
        """paired, unpaired, triple or listwise: fixes K, the completions per example."""
        return "listwise" if self.format == "ranked" and self.ranked == "listwise" else (
            KIND_OF_FORMAT[self.format])


def normalize_row(row: dict, index: int, spec: FormatSpec) -> list[Record]:
    """Validates one raw row and turns it into records (ranked rows may give several)."""
    if not isinstance(row, dict):
        raise DataError(index, None, f"wrong type: a row must be a dict, got "
                        f"{type(row).__name__}")
    check_format(row, index, spec.format)
    conv, fields = spec.conversational, optional_fields(row, index, spec.format)
    if spec.format == "ranked":
        return ranked_records(row, index, spec, fields)
    if spec.format == "unpaired":
        prompt = check_text(row["prompt"], index, "prompt", conv, completion=False)
        completion = check_text(row["completion"], index, "completion", conv, completion=True)
        fields["label"] = check_label(row["label"], index)
        return [Record(index, prompt, [completion], fields)]
    if row["chosen"] == row["rejected"]:
        raise DataError(index, "rejected", "chosen identical to rejected")
    if spec.format == "implicit_preference":
        for field in ("chosen", "rejected"):
            check_text(row[field], index, field, conv, completion=True)
        prompt, chosen, rejected = split_shared_prefix(row["chosen"], row["rejected"], index)
    else:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    prompt = check_text(prompt, index, "prompt", conv, completion=False)
    completions = [check_text(chosen, index, "chosen", conv, completion=True),
                   check_text(rejected, index, "rejected", conv, completion=True)]
    if spec.format == "triple":
        completions.append(check_text(row["gold"], index, "gold", conv, completion=True))
    return [Record(index, prompt, completions, fields)]


def ranked_records(row: dict, index: int, spec: FormatSpec, fields: dict) -> list[Record]:
    """A scored list as pairs (best vs worst, all, best vs random) or one listwise record."""
    prompt = check_text(row["prompt"], index, "prompt", spec.conversational, completion=False)
    texts, scores = row["completions"], row["scores"]
    for field, value in (("completions", texts), ("scores", scores)):
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise DataError(index, field, f"wrong type: expected a list, got "
                            f"{type(value).__name__}")
    if len(texts) != len(scores):
        raise DataError(index, "scores", f"{len(scores)} scores for {len(texts)} completions")
    if len(texts) < 2:
        raise DataError(index, "completions", f"a ranked row needs at least 2 completions, "
                        f"got {len(texts)}")
    texts = [check_text(t, index, f"completions[{i}]", spec.conversational, completion=True)
             for i, t in enumerate(texts)]
    scores = [check_number(s, index, f"scores[{i}]") for i, s in enumerate(scores)]
    if spec.ranked == "listwise":
        k = spec.list_size or len(texts)
        if len(texts) > k:
            raise DataError(index, "completions", f"{len(texts)} completions, more than "
                            f"list_size {k}")
        pad = k - len(texts)
        return [Record(index, prompt, texts + [None] * pad,
                       dict(fields, scores=scores + [math.nan] * pad))]
    records = []
    for i, j in ranked_pairs(scores, spec.ranked, spec.seed, index):
        if texts[i] == texts[j]:
            raise DataError(index, f"completions[{j}]", f"identical to completions[{i}] but "
                            "scored differently")
        extra = dict(score_chosen=scores[i], score_rejected=scores[j])
        records.append(Record(index, prompt, [texts[i], texts[j]], {**fields, **extra}))
    return records


def ranked_pairs(scores: list[float], mode: str, seed: int, index: int) -> list[tuple[int, int]]:
    """(chosen, rejected) positions from scores; ties give no pair (counted by the caller)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    best, worst = int(order[0]), int(order[-1])
    if scores[best] == scores[worst]:
        return []
    if mode == "best_vs_worst":
        return [(best, worst)]
    if mode == "all_pairs":
        return [(int(i), int(j)) for a, i in enumerate(order) for j in order[a + 1:]
                if scores[i] > scores[j]]
    if mode == "best_vs_random":
        lower = [i for i in range(len(scores)) if scores[i] < scores[best]]
        pick = np.random.default_rng([seed, index]).integers(len(lower))
        return [(best, lower[int(pick)])]
    raise ValueError(f"unknown ranked mode '{mode}'; expected one of {RANKED_MODES}")


def normalize(rows: Iterable[dict], spec: FormatSpec, report: DataReport, *, start: int = 0,
              skip_bad_rows: bool = False) -> list[Record]:
    """Normalises rows numbered from start into records, counting into report.

    A bad row raises its DataError, or with skip_bad_rows is recorded in report.skipped.
    """
    records = []
    for offset, row in enumerate(rows):
        report.counts["rows_read"] += 1
        try:
            out = normalize_row(row, start + offset, spec)
        except DataError as err:
            if not skip_bad_rows:
                raise
            report.skip(err)
            continue
        if not out:
            report.counts["ranked_rows_all_tied"] += 1
        records.extend(out)
    return records

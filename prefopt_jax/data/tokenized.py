"""Tokenised examples in flat columnar arrays, saved to and loaded from .npz atomically.

Shape letters: `n` examples, `k` completions per example (K), `t` concatenated tokens.
Example i has prompt tokens prompt_tokens_t[prompt_offsets[i]:prompt_offsets[i + 1]] and
completion j (0 <= j < K) at completion_offsets[i * K + j] of completion_tokens_t; a filler
completion (listwise rows shorter than K) is empty.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

# Per-example fields and their defaults when a dataset does not carry them.
FIELD_DEFAULTS = {"weight": 1.0, "margin": 0.0, "score_chosen": np.nan, "score_rejected": np.nan,
                  "win_prob_chosen": np.nan, "win_prob_rejected": np.nan}
SIDE_NAMES = {"paired": ("chosen", "rejected"), "triple": ("chosen", "rejected", "gold"),
              "unpaired": ("completion",)}


def side_names(kind: str, k: int) -> tuple[str, ...]:
    """Names of the K completions of an example, for messages and histograms."""
    return SIDE_NAMES.get(kind) or tuple(f"completions[{j}]" for j in range(k))


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Start offsets [n + 1] of consecutive chunks with the given lengths."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


@dataclasses.dataclass
class TokenizedData:
    """The tokenised examples of one data shard (one host's slice)."""

    kind: str
    num_completions: int
    prompt_tokens_t: np.ndarray
    prompt_offsets: np.ndarray
    completion_tokens_t: np.ndarray
    completion_offsets: np.ndarray
    example_index_n: np.ndarray
    fields: dict

    def __len__(self) -> int:
        return len(self.example_index_n)

    @property
    def prompt_lengths_n(self) -> np.ndarray:
        """Prompt length of each example."""
        return np.diff(self.prompt_offsets)

    @property
    def completion_lengths_nk(self) -> np.ndarray:
        """Length of each completion of each example (0 for filler)."""
        return np.diff(self.completion_offsets).reshape(len(self), self.num_completions)

    def prompt(self, i: int) -> np.ndarray:
        """Prompt tokens of example i."""
        return self.prompt_tokens_t[self.prompt_offsets[i]:self.prompt_offsets[i + 1]]

    def completion(self, i: int, j: int) -> np.ndarray:
        """Tokens of completion j of example i."""
        at = i * self.num_completions + j
        return self.completion_tokens_t[self.completion_offsets[at]:self.completion_offsets[at + 1]]

    def field(self, name: str) -> np.ndarray:
        """A per-example field, with its default where the dataset does not carry it."""
        if name in self.fields:
            return self.fields[name]
        return np.full(len(self), FIELD_DEFAULTS[name], np.float32)

    def select(self, keep_n: np.ndarray) -> TokenizedData:
        """The examples at the given positions, in that order."""
        keep_n = np.asarray(keep_n, np.int64)
        k = self.num_completions
        prompts = [self.prompt(i) for i in keep_n]
        completions = [self.completion(i, j) for i in keep_n for j in range(k)]
        return from_lists(self.kind, k, prompts, completions, self.example_index_n[keep_n],
                          {name: v[keep_n] for name, v in self.fields.items()})

    def save(self, path: str, extra: dict | None = None) -> None:
        """Writes an .npz atomically (temporary file, then rename), with extra arrays beside."""
        arrays = dict(extra or {})
        arrays.update({f"field/{k}": v for k, v in self.fields.items()})
        arrays.update({k: getattr(self, k) for k in _ARRAYS})
        arrays["meta"] = np.array([self.kind, str(self.num_completions)])
        save_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str) -> TokenizedData:
        """Reads what save wrote."""
        with np.load(path, allow_pickle=False) as z:
            kind, k = (str(x) for x in z["meta"])
            fields = {name[6:]: z[name] for name in z.files if name.startswith("field/")}
            return cls(kind, int(k), **{name: z[name] for name in _ARRAYS}, fields=fields)


_ARRAYS = ("prompt_tokens_t", "prompt_offsets", "completion_tokens_t", "completion_offsets",
           "example_index_n")


def from_lists(kind: str, k: int, prompts: list, completions: list, example_index_n,
               fields: dict) -> TokenizedData:
    """Builds TokenizedData from per-example prompt and per-(example, side) completion tokens."""
    def flat(chunks):
        if not chunks:
            return np.zeros(0, np.int32)
        return np.concatenate([np.asarray(c, np.int32) for c in chunks]).astype(np.int32)

    return TokenizedData(
        kind, k, flat(prompts), offsets_of(np.array([len(p) for p in prompts], np.int64)),
        flat(completions), offsets_of(np.array([len(c) for c in completions], np.int64)),
        np.asarray(example_index_n, np.int64), fields)


def save_npz_atomic(path: str, arrays: dict) -> None:
    """np.savez into a temporary file beside path, then an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def unpair(data: TokenizedData) -> TokenizedData:
    """Paired examples as unpaired ones: each chosen desirable, each rejected undesirable (the
    way TRL's KTO and BCO read paired data); per-example fields other than weight are dropped.

    The example of row i's chosen completion gets example index 2i, its rejected one 2i + 1
    (indices stay unique, as the reference cache needs).
    """
    n = len(data)
    prompts = [data.prompt(i // 2) for i in range(2 * n)]
    completions = [data.completion(i // 2, i % 2) for i in range(2 * n)]
    fields = {"label": (np.arange(2 * n) % 2 == 0).astype(np.float32)}
    if "weight" in data.fields:
        fields["weight"] = np.repeat(data.fields["weight"], 2)
    index_n = 2 * np.repeat(data.example_index_n, 2) + np.arange(2 * n) % 2
    return from_lists("unpaired", 1, prompts, completions, index_n, fields)


def take_completions(data: TokenizedData, kind: str, k: int) -> TokenizedData:
    """The first `k` completions of each example, as data of `kind` (a triple's chosen and
    rejected as paired data)."""
    prompts = [data.prompt(i) for i in range(len(data))]
    completions = [data.completion(i, j) for i in range(len(data)) for j in range(k)]
    return from_lists(kind, k, prompts, completions, data.example_index_n, dict(data.fields))


KIND_FIELDS = {"paired": "prompt, chosen, rejected",
               "triple": "prompt, gold, chosen, rejected",
               "unpaired": "prompt, completion, label",
               "listwise": "prompt, completions, scores"}


# How data of one kind is read as another: paired -> unpaired (each side labelled), triple ->
# paired (the gold completion left out), paired -> listwise (lists of two, chosen ranked first).
def as_kind(data: TokenizedData, kind: str, source: str = "the data") -> TokenizedData:
    """`data` as examples of `kind`, where a reading exists; otherwise a ValueError naming both."""
    if data.kind == kind:
        return data
    if (data.kind, kind) == ("paired", "unpaired"):
        return unpair(data)
    if (data.kind, kind) == ("triple", "paired"):
        return take_completions(data, "paired", 2)
    if (data.kind, kind) == ("paired", "listwise"):
        listed = take_completions(data, "listwise", 2)
        listed.fields["scores"] = np.tile(np.array([1.0, 0.0], np.float32), (len(data), 1))
        return listed
    have = ", ".join(side_names(data.kind, data.num_completions))
    raise ValueError(f"{source} holds {data.kind} examples ({have}); the objective reads "
                     f"{kind} examples ({KIND_FIELDS.get(kind, kind)})")

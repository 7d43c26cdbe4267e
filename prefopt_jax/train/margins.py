"""Margins from other reward models (MODPO): every completion's reward under M other reward
models, computed once over the training data, cached on disk, and added to each batch.

Sources, named in `AlgoConfig.margins`:
  rm:DIR            a reward model that `prefopt train` saved (`rewards.reward_model.save`),
                    or a Hugging Face `*ForSequenceClassification` one (`reward_model.load`);
  implicit:teacher  the implicit reward `b (L_teacher(y) - L_ref(y))` of `AlgoConfig.teacher`
                    against its reference (`TeacherConfig.reference`, or the run's reference
                    model); the per-token log-probs come from the reference cache
                    (`train.refcache`), so both passes are cached and shared.

A reward model's scores are cached under a key of the data fingerprint, its weights and the
layout, like reference log-probs. Batches get `margins` `[P, K, M]` (filler examples: 0).

Shape letters: `n` examples, `k` completions per example, `m` margin sources, `p` examples of
a batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
from flax import nnx

from prefopt_jax.data.tokenized import save_npz_atomic
from prefopt_jax.losses import ObjectiveError
from prefopt_jax.train import refcache

VERSION = "1"
KINDS = ("rm", "implicit")


@dataclasses.dataclass
class MarginTable:
    """Rewards `[N, K, M]` of every completion of every example, by example index."""

    values_nkm: np.ndarray
    position_of: dict

    def fill(self, batch: dict) -> dict:
        """The batch with `margins` `[P, K, M]`."""
        _, k, m = self.values_nkm.shape
        out_pkm = np.zeros((len(batch["example_index"]), k, m), np.float32)
        for p, example in enumerate(batch["example_index"]):
            if example >= 0:
                out_pkm[p] = self.values_nkm[self.position_of[int(example)]]
        return {**batch, "margins": out_pkm}


def parse(source: str) -> tuple[str, str]:
    """(kind, argument) of a margin source; unknown forms are refused naming the binding."""
    kind, _, arg = source.partition(":")
    if kind not in KINDS or not arg or (kind == "implicit" and arg != "teacher"):
        raise ObjectiveError(f"AlgoConfig.margins: unknown source {source!r}; use 'rm:DIR' (a "
                             "saved reward model) or 'implicit:teacher' (AlgoConfig.teacher)")
    return kind, arg


def sequence_sums(cache: refcache.RefLogps, data) -> np.ndarray:
    """Summed cached log-probs `[N, K]` of every completion of `data`'s examples."""
    total_t = np.concatenate([[0.0], np.cumsum(cache.values_t, dtype=np.float64)])
    sums_s = total_t[cache.offsets[1:]] - total_t[cache.offsets[:-1]]
    k = cache.num_completions
    rows = [cache.position_of[int(e)] for e in data.example_index_n]
    return sums_s.reshape(-1, k)[rows].astype(np.float32)


def reward_model_scores(directory: str, cache_dir: str, data, layout, batch_size: int):
    """Scores `[N, K]` of the reward model saved in `directory`, cached by data and weights."""
    from prefopt_jax.rewards import reward_model as rm_lib

    if not os.path.isdir(directory):
        raise ObjectiveError(f"AlgoConfig.margins: no reward model at {directory!r}")
    rm, _ = rm_lib.load(directory)
    key = "|".join([VERSION, refcache.data_fingerprint(data),
                    refcache.params_fingerprint(nnx.state(rm, nnx.Param)),
                    repr(sorted(dataclasses.asdict(layout).items()))])
    path = os.path.join(cache_dir, "margins-" + hashlib.sha256(key.encode()).hexdigest()[:32]
                        + ".npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return z["scores"]
    scores = rm_lib.score_examples(rm, data, batch_size, layout)
    save_npz_atomic(path, {"scores": scores})
    return scores


def load_or_compute(sources, cache_dir: str, data, layout, batch_size: int, *, teacher=None,
                    reference=None, beta: float = 0.1, chunk_size: int = 512) -> MarginTable:
    """The margins of `data` from each source, computed (and cached) on a miss.

    `teacher`, `reference`: (graphdef, params, rest) of the teacher and its reference, for
    'implicit:teacher'.
    """
    columns = []
    for source in sources:
        kind, arg = parse(source)
        if kind == "rm":
            columns.append(reward_model_scores(arg, cache_dir, data, layout, batch_size))
            continue
        if teacher is None:
            raise ObjectiveError("AlgoConfig.margins 'implicit:teacher' needs AlgoConfig.teacher "
                                 "= @TeacherConfig() with TeacherConfig.source")
        sums = [sequence_sums(refcache.load_or_compute(cache_dir, data, layout, batch_size, *model,
                                                       chunk_size), data)
                for model in (teacher, reference)]
        columns.append(beta * (sums[0] - sums[1]))
    position_of = {int(e): i for i, e in enumerate(data.example_index_n)}
    return MarginTable(np.stack(columns, axis=-1).astype(np.float32), position_of)

"""Precomputed reference log-probs: one pass over the data, cached on disk, reused across runs.

Shape letters: `q` sequences, `c` completion positions, `t` flat token positions, `s` cached
sequences (examples x completions, in the data's order).

The cache holds, for every completion of every local example, the reference's per-token
log-probs of its completion tokens in order, so it is independent of the order and the layout
batches are built in (the layout still enters the key: its numerics may differ in the last
bits). The file name is a hash of the data fingerprint, the reference weights and the layout;
files are written to a temporary name and renamed, so a killed run never leaves half a cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.data.tokenized import offsets_of, save_npz_atomic
from prefopt_jax.train import logps as logps_lib

VERSION = "1"


def _hash_arrays(items) -> str:
    h = hashlib.sha256()
    for name, value in items:
        value = np.ascontiguousarray(np.asarray(value))
        h.update(f"{name}:{value.dtype}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def data_fingerprint(data: data_lib.TokenizedData) -> str:
    """Hash of a data shard's tokens, offsets, example indices and fields."""
    arrays = [(k, getattr(data, k)) for k in ("prompt_tokens_t", "prompt_offsets",
                                              "completion_tokens_t", "completion_offsets",
                                              "example_index_n")]
    fields = [(f"field/{k}", v) for k, v in sorted(data.fields.items())]
    return _hash_arrays(arrays + fields + [("kind", np.array([data.kind]))])


def params_fingerprint(params) -> str:
    """Hash of every leaf of a parameter tree (paths, dtypes, shapes and values)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return _hash_arrays((jax.tree_util.keystr(path), jax.device_get(leaf))
                        for path, leaf in leaves)


def cache_path(cache_dir: str, data_fp: str, params_fp: str, layout) -> str:
    """The cache file of (data, reference weights, layout settings)."""
    key = "|".join([VERSION, data_fp, params_fp, repr(sorted(dataclasses.asdict(layout).items()))])
    return os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")


@dataclasses.dataclass
class RefLogps:
    """Per-token reference log-probs of every (example, completion), in the data's order."""

    values_t: np.ndarray
    offsets: np.ndarray
    position_of: dict
    num_completions: int

    def fill(self, batch: dict) -> dict:
        """The batch with `ref_logps` `[Q, C]` (0 on filler and padding positions)."""
        mask_qc = batch["completion_mask"] > 0
        out_qc = np.zeros(mask_qc.shape, np.float32)
        k = self.num_completions
        for q, example in enumerate(np.repeat(batch["example_index"], k)):
            if example < 0:
                continue
            s = self.position_of[int(example)] * k + q % k
            out_qc[q, mask_qc[q]] = self.values_t[self.offsets[s]:self.offsets[s + 1]]
        return {**batch, "ref_logps": out_qc}


def evaluate_reference(forward, data: data_lib.TokenizedData, layout, batch_size: int):
    """One in-order pass: (values_t, offsets) of every completion's reference log-probs."""
    k = data.num_completions
    chunks = [None] * (len(data) * k)
    position_of = {int(e): i for i, e in enumerate(data.example_index_n)}
    loader = data_lib.Loader(data, batch_size, layout, shuffle=False, num_epochs=1)
    for batch in loader:
        logps_qc = np.asarray(forward(batch), np.float32)
        mask_qc = batch["completion_mask"] > 0
        for q, example in enumerate(np.repeat(batch["example_index"], k)):
            if example >= 0:
                chunks[position_of[int(example)] * k + q % k] = logps_qc[q, mask_qc[q]]
    lengths = np.array([len(c) for c in chunks], np.int64)
    values_t = np.concatenate(chunks).astype(np.float32) if len(chunks) else np.zeros(0)
    return values_t, offsets_of(lengths)


def model_forward(graphdef, params, rest, chunk_size: int):
    """A jitted `batch -> [Q, C]` log-probs of the model with these Params (no mesh)."""
    @jax.jit
    def fwd(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        return logps_lib.token_logps(model, batch, chunk_size)

    keys = ("tokens", "positions", "segment_ids", "branch_ids", "source_index", "target_tokens")
    return lambda batch: fwd(params, rest, {k: batch[k] for k in keys})


def load_or_compute(cache_dir: str, data: data_lib.TokenizedData, layout, batch_size: int,
                    graphdef, params, rest, chunk_size: int = 512) -> RefLogps:
    """The cached reference log-probs of `data`, computed (and written) on a miss."""
    path = cache_path(cache_dir, data_fingerprint(data), params_fingerprint(params), layout)
    if os.path.exists(path):
        with np.load(path) as z:
            values_t, offsets = z["values_t"], z["offsets"]
    else:
        forward = model_forward(graphdef, params, rest, chunk_size)
        values_t, offsets = evaluate_reference(forward, data, layout, batch_size)
        save_npz_atomic(path, {"values_t": values_t, "offsets": offsets})
    position_of = {int(e): i for i, e in enumerate(data.example_index_n)}
    return RefLogps(values_t, offsets, position_of, data.num_completions)

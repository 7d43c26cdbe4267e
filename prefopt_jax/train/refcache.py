"""Precomputed reference log-probs: one pass over the data, cached on disk, reused across runs.

Shape letters: `q` sequences, `c` completion positions, `t` flat token positions, `s` cached
sequences (examples x completions, in the data's order).

The cache holds, for every completion of every local example, the reference's per-token
log-probs of its completion tokens in order, so it is independent of the order and the layout
batches are built in (the layout still enters the key: its numerics may differ in the last
bits). The file name is a hash of the data fingerprint, the reference weights and the layout;
files are written to a temporary name and renamed, so a killed run never leaves half a cache.

Multi-host: one cache file holds every host's examples (hosts in process order) under one key,
the hash of every host's data fingerprint, agreed by all. On a miss each host evaluates the
examples it loads, the results are gathered, process 0 alone writes the file and the others wait
on a barrier. It is a hit only when every host sees the file, so `cache_dir` belongs on a file
system all hosts share (like the checkpoints); otherwise each run recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from prefopt_jax import data as data_lib
from prefopt_jax.data.tokenized import offsets_of, save_npz_atomic
from prefopt_jax.scoring import logps as logps_lib

VERSION = "2"  # 2: one file for all hosts, with example_index


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

    @classmethod
    def of(cls, values_t, offsets, example_index_n, num_completions: int) -> "RefLogps":
        """From the cached arrays; `example_index_n` names the examples in cache order."""
        position_of = {int(e): i for i, e in enumerate(example_index_n)}
        if len(position_of) != len(example_index_n):
            raise ValueError("reference cache: example indices repeat across the data shards, "
                             "so cached log-probs cannot be matched to examples")
        return cls(values_t, offsets, position_of, num_completions)

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
    """The cached reference log-probs of every host's `data`, computed (and written) on a miss.

    Call on every process (multi-host: it gathers, and process 0 writes).
    """
    path = cache_path(cache_dir, global_data_fingerprint(data), agreed_params_fingerprint(params),
                      layout)
    if _on_every_host(os.path.exists(path)):
        print(f"reference log-probs: cache hit {path}", flush=True)
        with np.load(path) as z:
            values_t, offsets, example_index_n = z["values_t"], z["offsets"], z["example_index"]
    else:
        print(f"reference log-probs: cache miss {path}", flush=True)
        forward = model_forward(graphdef, params, rest, chunk_size)
        local_t, local_offsets = evaluate_reference(forward, data, layout, batch_size)
        values_t, offsets, example_index_n = gather_shards(local_t, local_offsets,
                                                           data.example_index_n)
        if jax.process_index() == 0:
            save_npz_atomic(path, {"values_t": values_t, "offsets": offsets,
                                   "example_index": example_index_n})
            print(f"reference log-probs: wrote {path}", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("refcache: " + os.path.basename(path))
    return RefLogps.of(values_t, offsets, example_index_n, data.num_completions)


def _gather_ragged(x_n: np.ndarray) -> list[np.ndarray]:
    """Every process's 1-D array (lengths may differ), in process order."""
    if jax.process_count() == 1:
        return [x_n]
    n_p = multihost_utils.process_allgather(np.int32(len(x_n)))
    padded = np.zeros(int(np.max(n_p)), x_n.dtype)
    padded[:len(x_n)] = x_n
    x_pn = multihost_utils.process_allgather(padded)
    return [x_pn[p, :int(n)] for p, n in enumerate(n_p)]


def _int32(x_n) -> np.ndarray:
    """Integers that cross hosts as int32 (JAX's default width); refuses any that do not fit."""
    x_n = np.asarray(x_n)
    if x_n.size and (x_n.min() < np.iinfo(np.int32).min or x_n.max() > np.iinfo(np.int32).max):
        raise ValueError("reference cache: an index does not fit in int32")
    return x_n.astype(np.int32)


def gather_shards(values_t, offsets, example_index_n):
    """(values_t, offsets, example_index) of all hosts' shards, hosts in process order."""
    if jax.process_count() == 1:
        return values_t, offsets, np.asarray(example_index_n)
    lengths = _gather_ragged(_int32(np.diff(offsets)))
    values = _gather_ragged(np.asarray(values_t, np.float32))
    examples = _gather_ragged(_int32(example_index_n))
    return (np.concatenate(values), offsets_of(np.concatenate(lengths)),
            np.concatenate(examples).astype(np.int64))


def _gather_hex(digest: str) -> list[str]:
    """Every process's sha256 hex digest, in process order."""
    if jax.process_count() == 1:
        return [digest]
    bytes_p32 = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
    return [bytes(row).hex() for row in np.asarray(bytes_p32, np.uint8)]


def global_data_fingerprint(data: data_lib.TokenizedData) -> str:
    """The data fingerprints of all hosts' shards in process order (one host: its own)."""
    return "+".join(_gather_hex(data_fingerprint(data)))


def agreed_params_fingerprint(params) -> str:
    """The reference weights' fingerprint, checked equal on every host."""
    digests = _gather_hex(params_fingerprint(params))
    if len(set(digests)) > 1:
        raise ValueError("reference log-probs: the reference weights differ across processes "
                         f"(fingerprints {[d[:12] for d in digests]}); every host must load the "
                         "same weights")
    return digests[0]


def _on_every_host(flag: bool) -> bool:
    """True when `flag` holds on every process (all hosts then take the same branch)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))

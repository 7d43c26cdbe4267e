"""Per-token log-probs of completion tokens, chunked so full-vocabulary fp32 logits never exist.

Shape letters: `r` batch rows, `t` row positions, `d` model width, `v` vocabulary, `q` sequences
(completions), `c` completion positions, `n` flattened gathered positions (`q * c`), `k` chunks,
`m` positions per chunk.

The model runs once with `return_hidden=True`; the hidden states that predict completion tokens
are gathered with the batch's flat `source_index` (`r * L + t`), and only those are projected to
the vocabulary, `chunk_size` positions at a time under `jax.checkpoint`, so the forward and the
backward pass each hold at most one `[chunk_size, V]` float32 block (invariant 4).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array


def model_hidden(model, batch: Mapping[str, Array]) -> Array:
    """Final hidden states `[R, L, D]` of the batch's rows (final norm applied)."""
    return model(batch["tokens"], batch["positions"], batch["segment_ids"], batch["branch_ids"],
                 return_hidden=True)


def chunk_target_logps(project: Callable[[Array], Array], hidden_md: Array,
                       targets_m: Array) -> Array:
    """log p(target) for `m` positions: project, log-softmax in float32, pick the target."""
    logits_mv = project(hidden_md[None])[0].astype(jnp.float32)
    logz_m = jax.nn.logsumexp(logits_mv, axis=-1)
    picked_m = jnp.take_along_axis(logits_mv, targets_m[:, None], axis=-1)[:, 0]
    return picked_m - logz_m


def gathered_logps(project: Callable[[Array], Array], hidden_rtd: Array, source_index_qc: Array,
                   target_tokens_qc: Array, chunk_size: int = 512) -> Array:
    """Float32 log-probs `[Q, C]` of `target_tokens` predicted at flat positions `source_index`.

    Masked positions are computed too (their index is any valid one) and left to the caller's
    mask; nothing here depends on the layout, so padded, packed and prefix-shared batches share
    one path.
    """
    r, t, d = hidden_rtd.shape
    q, c = source_index_qc.shape
    n = q * c
    m = max(1, min(chunk_size, n))
    k = -(-n // m)
    index_n = jnp.clip(source_index_qc.reshape(n), 0, r * t - 1)
    targets_n = target_tokens_qc.reshape(n)
    pad = k * m - n
    index_n = jnp.pad(index_n, (0, pad))
    targets_n = jnp.pad(targets_n, (0, pad))
    hidden_kmd = hidden_rtd.reshape(r * t, d)[index_n].reshape(k, m, d)
    # Recompute each chunk's logits in the backward pass instead of saving [m, V] per chunk.
    body = jax.checkpoint(lambda h_md, y_m: chunk_target_logps(project, h_md, y_m))
    logps_km = jax.lax.map(lambda xs: body(*xs), (hidden_kmd, targets_n.reshape(k, m)))
    return logps_km.reshape(k * m)[:n].reshape(q, c)


def token_logps(model, batch: Mapping[str, Array], chunk_size: int = 512) -> Array:
    """Float32 per-token log-probs `[Q, C]` of the batch's completion tokens under `model`."""
    hidden_rtd = model_hidden(model, batch)
    return gathered_logps(model.project, hidden_rtd, batch["source_index"],
                          batch["target_tokens"], chunk_size)


def naive_token_logps(model, batch: Mapping[str, Array]) -> Array:
    """Reference implementation through full `[R, L, V]` logits (tests only: memory heavy)."""
    logits_rtv = model(batch["tokens"], batch["positions"], batch["segment_ids"],
                       batch["branch_ids"]).astype(jnp.float32)
    r, t, v = logits_rtv.shape
    logp_nv = jax.nn.log_softmax(logits_rtv.reshape(r * t, v), axis=-1)
    q, c = batch["source_index"].shape
    picked = logp_nv[batch["source_index"].reshape(-1), batch["target_tokens"].reshape(-1)]
    return picked.reshape(q, c)

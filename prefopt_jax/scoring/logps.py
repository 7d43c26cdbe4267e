"""Per-token log-probs of completion tokens, chunked so full-vocabulary fp32 logits never exist.

Shape letters: `r` batch rows, `t` row positions, `d` model width, `v` vocabulary, `q` sequences
(completions), `c` completion positions, `n` flattened gathered positions (`q * c`), `k` chunks,
`m` positions per chunk, `s` rows of a mismatched batch, `u` its row positions.

The model runs once with `return_hidden=True`; the hidden states that predict completion tokens
are gathered with the batch's flat `source_index` (`r * L + t`), and only those are projected to
the vocabulary, `chunk_size` positions at a time under `jax.checkpoint`, so the forward and the
backward pass each hold at most one `[chunk_size, V]` float32 block per model (invariant 4).
`gathered_terms` computes any per-token function of one or several models' logits that way
(target log-probs, WPO's `log sum_v p_v^2`, AlignDistil's KL to a teacher).

`mismatched_batch` builds, inside the step, the batch of KTO's mismatched sequences (prompt of
example q, completion of the next example) from any layout's batch.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def model_hidden(model, batch: Mapping[str, Array]) -> Array:
    """Final hidden states `[R, L, D]` of the batch's rows (final norm applied)."""
    return model(batch["tokens"], batch["positions"], batch["segment_ids"], batch["branch_ids"],
                 return_hidden=True)


def float32_projection(model) -> Callable[[Array], Array]:
    """`model.project` returning float32 logits (a bf16 model's are not rounded to bf16)."""
    return lambda hidden: model.project(hidden, jnp.float32)


def target_terms(logits_mv: Array, targets_m: Array, token_stats: bool = False,
                 entropy: bool = False, entropy_gradient: bool = True) -> dict:
    """Per-position terms of one model's float32 logits: `logps` of the targets, with
    `token_stats` WPO's `log_sum_p2 = log sum_v p_v^2` (no gradient: WPO's weights are frozen),
    with `entropy` the distribution's entropy `logZ - sum_v p_v z_v`, with gradient unless
    `entropy_gradient` is False (a value to report: its backward pass, over the whole
    vocabulary, is then not computed)."""
    logz_m = jax.nn.logsumexp(logits_mv, axis=-1)
    picked_m = jnp.take_along_axis(logits_mv, targets_m[:, None], axis=-1)[:, 0]
    out = {"logps": picked_m - logz_m}
    if token_stats:
        logp_mv = jax.lax.stop_gradient(logits_mv - logz_m[:, None])
        out["log_sum_p2"] = jax.nn.logsumexp(2.0 * logp_mv, axis=-1)
    if entropy:
        p_mv = jnp.exp(logits_mv - logz_m[:, None])
        entropy_m = logz_m - jnp.sum(p_mv * logits_mv, axis=-1)
        out["entropy"] = entropy_m if entropy_gradient else jax.lax.stop_gradient(entropy_m)
    return out


def gathered_terms(fn: Callable[..., dict], projects: Sequence[Callable[[Array], Array]],
                   hiddens_rtd: Sequence[Array], source_index_qc: Array, target_tokens_qc: Array,
                   chunk_size: int = 512, mask_qc: Array | None = None) -> dict:
    """Per-token terms `[Q, C]` of several models' logits at the flat positions `source_index`.

    `fn(logits_mv_0, logits_mv_1, ..., targets_m) -> {name: [m]}` sees each model's float32
    logits (`projects[i]` of `hiddens_rtd[i]`) of one chunk of `m` positions at a time, so the
    forward and the backward pass each hold at most one `[m, V]` float32 block per model
    (invariant 4); the chunk is recomputed in the backward pass (`jax.checkpoint`).

    Without `mask_qc` every position is computed (a masked one's index is any valid one) and
    left to the caller's mask. With it, the positions are computed in chunks of the unmasked ones
    only (moved to the front, in order) and the chunks holding none are skipped at run time
    (`lax.cond`), so the vocabulary projection costs what the real completion tokens need
    rather than `Q * C` (C is the longest completion's bucket); masked positions come back 0.
    Nothing here depends on the layout, so padded, packed and prefix-shared batches share one
    path.
    """
    r, t, _ = hiddens_rtd[0].shape
    q, c = source_index_qc.shape
    n = q * c
    m = max(1, min(chunk_size, n))
    k = -(-n // m)
    pad = k * m - n
    index_n = jnp.clip(jnp.asarray(source_index_qc).reshape(n), 0, r * t - 1)
    targets_n = jnp.asarray(target_tokens_qc).reshape(n)
    if mask_qc is None:
        order_n, valid = None, jnp.asarray(n, jnp.int32)
    else:
        real_n = jnp.asarray(mask_qc).reshape(n) > 0
        order_n = jnp.argsort(~real_n, stable=True)  # real positions first, in order
        index_n, targets_n = index_n[order_n], targets_n[order_n]
        valid = jnp.sum(real_n.astype(jnp.int32))
    index_n = jnp.pad(index_n, (0, pad))
    targets_km = jnp.pad(targets_n, (0, pad)).reshape(k, m)
    hiddens_kmd = [h.reshape(r * t, h.shape[-1])[index_n].reshape(k, m, h.shape[-1])
                   for h in hiddens_rtd]
    shapes = jax.eval_shape(lambda y: fn(*[jnp.zeros((m, 1), jnp.float32) for _ in projects], y),
                            targets_km[0])

    # Recompute each chunk's logits in the backward pass instead of saving [m, V] per chunk.
    # The skip sits inside the checkpoint: a checkpoint inside the cond would make the cond
    # return the projection weights as a residual, stacked once per chunk by the map.
    @jax.checkpoint
    def chunk(xs):
        i, y_m, *h_md = xs

        def compute(y_m, *h_md):
            return fn(*[project(h[None])[0].astype(jnp.float32)
                        for project, h in zip(projects, h_md)], y_m)

        def skip(y_m, *h_md):
            return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

        return jax.lax.cond(i * m < valid, compute, skip, y_m, *h_md)

    terms_km = jax.lax.map(chunk, (jnp.arange(k, dtype=jnp.int32), targets_km, *hiddens_kmd))

    def unsort(x_km):
        x_n = x_km.reshape(k * m)[:n]
        if order_n is not None:
            x_n = jnp.zeros_like(x_n).at[order_n].set(x_n, unique_indices=True)
            x_n = jnp.where(real_n, x_n, 0.0)
        return x_n.reshape(q, c)

    return {name: unsort(x_km) for name, x_km in terms_km.items()}


def gathered_logps(project: Callable[[Array], Array], hidden_rtd: Array, source_index_qc: Array,
                   target_tokens_qc: Array, chunk_size: int = 512,
                   mask_qc: Array | None = None) -> Array:
    """Float32 log-probs `[Q, C]` of `target_tokens` predicted at flat positions `source_index`
    (one model's `gathered_terms`; masked positions are 0 when `mask_qc` is given)."""
    return gathered_terms(lambda logits_mv, y_m: target_terms(logits_mv, y_m), [project],
                          [hidden_rtd], source_index_qc, target_tokens_qc, chunk_size,
                          mask_qc)["logps"]


def token_logps(model, batch: Mapping[str, Array], chunk_size: int = 512) -> Array:
    """Float32 per-token log-probs `[Q, C]` of the batch's completion tokens under `model`.

    With the batch's `completion_mask`, only unmasked positions are computed (the others are 0).
    """
    hidden_rtd = model_hidden(model, batch)
    return gathered_logps(float32_projection(model), hidden_rtd, batch["source_index"],
                          batch["target_tokens"], chunk_size, batch.get("completion_mask"))


def naive_token_logps(model, batch: Mapping[str, Array]) -> Array:
    """Reference implementation through full `[R, L, V]` logits (tests only: memory heavy)."""
    logits_rtv = model(batch["tokens"], batch["positions"], batch["segment_ids"],
                       batch["branch_ids"]).astype(jnp.float32)
    r, t, v = logits_rtv.shape
    logp_nv = jax.nn.log_softmax(logits_rtv.reshape(r * t, v), axis=-1)
    q, c = batch["source_index"].shape
    picked = logp_nv[batch["source_index"].reshape(-1), batch["target_tokens"].reshape(-1)]
    return picked.reshape(q, c)


def next_valid(valid_q: Array) -> Array:
    """For each real example, the index of the next real one in batch order (the last wraps).

    Filler examples get some index; with one real example it is its own successor.
    """
    valid_q = valid_q > 0
    count = jnp.maximum(jnp.sum(valid_q.astype(jnp.int32)), 1)
    rank_q = jnp.cumsum(valid_q.astype(jnp.int32)) - 1
    real_first_q = jnp.argsort(~valid_q, stable=True)  # real indices first, in order
    return real_first_q[(rank_q + 1) % count]


def next_fit(length_q: Array, row_length: int) -> tuple[Array, Array, Array]:
    """(row, offset, segment id) of sequences placed in order: the current row, or a new one."""
    def body(carry, n):
        row, cursor, segment = carry
        new = cursor + n > row_length
        row, cursor, segment = row + new, jnp.where(new, 0, cursor), jnp.where(new, 1, segment + 1)
        return (row, cursor + n, segment), (row, cursor, segment)

    zero = jnp.zeros((), jnp.int32)
    _, placed = jax.lax.scan(body, (zero, zero, zero), length_q.astype(jnp.int32))
    return placed


def mismatched_rows(num_rows: int, row_length: int, q: int, c: int) -> tuple[int, int]:
    """(S, U): rows and row length of the mismatched batch of a `[R, L]` batch.

    A prompt has at most L - 1 tokens, so each sequence fits a row of U = L + C. The sequences
    hold as many tokens as the batch's real examples (the completions are only permuted) when
    each example's prompt and completion occupy their own tokens, as in every layout for
    unpaired data (K = 1); next-fit then needs at most 2 ceil(R L / U) - 1 rows, and never
    more than one per sequence.
    """
    u = row_length + c
    return min(q, 2 * (-(-num_rows * row_length // u)) - 1), u


def shifted_sequences(batch: Mapping[str, Array], u: int):
    """Example q's prompt then the next real example's completion, left-aligned in `[Q, U]`.

    Example q's prompt is the run of tokens ending at `source_index[q, 0]`, `positions + 1`
    long there, in every layout. Returns (tokens_qu, prompt_q, length_q, next_q, mask_qc):
    prompt and total lengths (0 for filler), the example whose completion follows, and that
    completion's mask (zero for filler).
    """
    tokens_rt, target_qc, mask_qc = (batch[k] for k in ("tokens", "target_tokens",
                                                         "completion_mask"))
    (r, t), c = tokens_rt.shape, target_qc.shape[1]
    next_q = next_valid(batch["pair_valid"])
    last_q = batch["source_index"][:, 0]
    prompt_q = batch["positions"].reshape(-1)[last_q] + 1
    real_q = (batch["pair_valid"] > 0) & (mask_qc[:, 0] > 0)
    new_mask_qc = mask_qc[next_q] * real_q[:, None].astype(mask_qc.dtype)
    length_q = jnp.where(real_q, prompt_q + jnp.sum(new_mask_qc > 0, axis=-1), 0)
    u_u = jnp.arange(u, dtype=jnp.int32)
    prompt_at_qu = jnp.clip(last_q[:, None] - prompt_q[:, None] + 1 + u_u[None], 0, r * t - 1)
    comp_at_qu = jnp.clip(u_u[None] - prompt_q[:, None], 0, c - 1)
    tokens_qu = jnp.where(u_u[None] < prompt_q[:, None], tokens_rt.reshape(-1)[prompt_at_qu],
                          jnp.take_along_axis(target_qc[next_q], comp_at_qu, axis=1))
    return tokens_qu, prompt_q, length_q, next_q, new_mask_qc


def mismatched_batch(batch: Mapping[str, Array]) -> tuple[dict, Array]:
    """KTO's mismatched sequences: prompt of example q + completion of the next real example.

    Works from the batch contract alone, so from any layout (`shifted_sequences`). The
    sequences are packed in order (next-fit) into `[S, U]` rows (`mismatched_rows`) and come
    back as a batch with the same keys, `Q` sequences in example order (filler: empty). Also
    returns `fits_q`, False for a sequence the rows could not hold (impossible for unpaired
    data; callers poison it).
    """
    (r, t), (q, c) = batch["tokens"].shape, batch["target_tokens"].shape
    s, u = mismatched_rows(r, t, q, c)
    tokens_qu, prompt_q, length_q, next_q, mask_qc = shifted_sequences(batch, u)
    row_q, start_q, segment_q = next_fit(length_q, u)
    fits_q = row_q < s
    u_u = jnp.arange(u, dtype=jnp.int32)
    flat_q = row_q * u + start_q
    placed_qu = (u_u[None] < length_q[:, None]) & fits_q[:, None]
    dest_qu = jnp.where(placed_qu, flat_q[:, None] + u_u[None], s * u)  # out of range: dropped

    def scatter(values_qu):
        out = jnp.zeros(s * u, jnp.int32).at[dest_qu].set(values_qu.astype(jnp.int32),
                                                          mode="drop")
        return out.reshape(s, u)

    source_qc = jnp.clip(flat_q[:, None] + prompt_q[:, None] - 1 + jnp.arange(c), 0, s * u - 1)
    out = {"tokens": scatter(tokens_qu), "positions": scatter(jnp.broadcast_to(u_u, (q, u))),
           "segment_ids": scatter(jnp.broadcast_to(segment_q[:, None], (q, u))),
           "branch_ids": jnp.zeros((s, u), jnp.int32), "source_index": source_qc.astype(jnp.int32),
           "target_tokens": batch["target_tokens"][next_q], "completion_mask": mask_qc}
    return out, fits_q

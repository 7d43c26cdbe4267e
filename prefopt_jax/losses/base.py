"""Input/output types of the objectives and the one place where sequences are reduced.

Every loss is `fn(inputs, state=None, **hyper) -> LossOutput`: arrays in, arrays out, no model
call. Per-token log-probs arrive with masks; sums, means, LD-DPO length-desensitised sums and the
reference-free case are all computed by `seq_reduce` / `pair_logps` below, never inside a loss.

Filler examples (valid = 0) keep shapes static: they get loss 0, enter no metric and no batch
statistic, and receive exactly zero gradient. They may hold any FINITE values; padding
positions (mask 0) may hold anything, nan included.

Shape letters: `p` pairs (prompts), `q` sequences in the batch layout (2P paired, P*K listwise),
`c` completion positions, `v` vocabulary, `n` unpaired examples, `k` list items, `x` any
leading axes.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, tuple[Array, Array]]

# A sentinel bigger than any log-prob sum yet finite, so sentinel - sentinel is 0 not nan.
BIG = 1e30


@flax.struct.dataclass
class PairwiseInputs:
    """One chosen (`w`) and one rejected (`l`) completion per prompt.

    Fields:
      logps_w_pc, logps_l_pc: [P, C] policy log-probs of the completion tokens.
      mask_w_pc, mask_l_pc: [P, C] float, 1 for real completion tokens.
      ref_logps_w_pc, ref_logps_l_pc: [P, C] reference log-probs, or None (reference-free: 0).
      valid_p: [P] 1 for real pairs, 0 for filler pairs (ignored exactly); None = all real.
      weight_p: [P] per-pair loss weight; None = 1.
      margin_p: [P] per-pair target margin (Bradley-Terry style losses); None = 0.
      score_w_p, score_l_p: [P] scalar scores/rewards of the completions (optional).
      token_weight_w_pc, token_weight_l_pc: [P, C] per-token weights on log-probs in sums and
        means (set by the LD-DPO modifier); None = 1.
      token_rewards_w_pc, token_rewards_l_pc: [P, C] frozen per-token rewards (tgdpo).
      logits_w_pcv, logits_l_pcv: [P, C, V] policy logits (WPO weights), optional.
      extras: dict of loss-specific arrays (see each loss's docstring).
    """

    logps_w_pc: Array
    logps_l_pc: Array
    mask_w_pc: Array
    mask_l_pc: Array
    ref_logps_w_pc: Array | None = None
    ref_logps_l_pc: Array | None = None
    valid_p: Array | None = None
    weight_p: Array | None = None
    margin_p: Array | None = None
    score_w_p: Array | None = None
    score_l_p: Array | None = None
    token_weight_w_pc: Array | None = None
    token_weight_l_pc: Array | None = None
    token_rewards_w_pc: Array | None = None
    token_rewards_l_pc: Array | None = None
    logits_w_pcv: Array | None = None
    logits_l_pcv: Array | None = None
    extras: dict[str, Any] = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class UnpairedInputs:
    """One completion per example with a desirable/undesirable label (kto, bco).

    Fields:
      logps_nc, mask_nc, ref_logps_nc (or None): [N, C] as in PairwiseInputs.
      label_n: [N] bool, True = desirable.
      valid_n, weight_n, token_weight_nc: as in PairwiseInputs (None = 1).
      kl_logps_nc, kl_ref_logps_nc, kl_mask_nc: [N, C] log-probs of mismatched completions
        (completion of example i+1 under prompt i) for KTO's reference point z0.
      extras: loss-specific arrays.
    """

    logps_nc: Array
    mask_nc: Array
    label_n: Array
    ref_logps_nc: Array | None = None
    valid_n: Array | None = None
    weight_n: Array | None = None
    token_weight_nc: Array | None = None
    kl_logps_nc: Array | None = None
    kl_ref_logps_nc: Array | None = None
    kl_mask_nc: Array | None = None
    extras: dict[str, Any] = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class ListwiseInputs:
    """K ranked completions per prompt.

    Fields:
      logps_pkc, mask_pkc, ref_logps_pkc (or None): [P, K, C].
      scores_pk: [P, K] label scores, higher is better.
      item_valid_pk: [P, K] 1 for real list items (lists shorter than K are padded); None = 1.
      valid_p, weight_p: [P] as in PairwiseInputs.
    """

    logps_pkc: Array
    mask_pkc: Array
    scores_pk: Array
    ref_logps_pkc: Array | None = None
    item_valid_pk: Array | None = None
    valid_p: Array | None = None
    weight_p: Array | None = None
    extras: dict[str, Any] = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class RewardPairInputs:
    """Scalar rewards of a chosen and a rejected completion (reward-model training).

    Fields: reward_w_p, reward_l_p [P]; margin_p [P] or None (0); valid_p, weight_p as above.
    """

    reward_w_p: Array
    reward_l_p: Array
    margin_p: Array | None = None
    valid_p: Array | None = None
    weight_p: Array | None = None


@flax.struct.dataclass
class DistillInputs:
    """Per-token distillation terms of every completion (token-level distillation).

    The vocabulary-wide part of a distillation objective is a per-token function of the
    student's, the teacher's and the reference's logits (`LossInfo.token_terms`, e.g.
    `tokenlevel.aligndistil_terms`); the engine evaluates it in the log-prob chunks, so no
    `[N, C, V]` logits exist, and passes the results here.

    Fields:
      kl_nc: [N, C] per-token divergence of the student from the teacher (with gradient).
      teacher_weight_nc: [N, C] per-token teacher weights (frozen).
      mask_nc: [N, C] completion mask; valid_n, weight_n as in UnpairedInputs.
    """

    kl_nc: Array
    teacher_weight_nc: Array
    mask_nc: Array
    valid_n: Array | None = None
    weight_n: Array | None = None


@flax.struct.dataclass
class RolloutInputs:
    """Sampled completions for the online RL losses (rl.py), groups of `group_size` in order.

    Fields:
      logps_nc, mask_nc: [N, C] current-policy log-probs and completion mask.
      rewards_n: [N] sequence reward r(x, y).
      old_logps_nc: [N, C] behaviour-policy log-probs; None = on-policy (logps, no gradient).
      ref_logps_nc: [N, C] reference log-probs; None = no KL term.
      values_nc, old_values_nc: [N, C] critic values now and at sampling time (ppo, rto).
      entropy_nc: [N, C] the current policy's entropy at each completion position (with
        gradient when the objective's `entropy_coef` is not 0, for the entropy bonus); None
        where the engine did not compute it.
      valid_n, weight_n: as in UnpairedInputs.
      extras: loss-specific arrays (rto: `dpo_log_ratio_nc`; pref_grpo: `win_prob_gkk`).
    """

    logps_nc: Array
    mask_nc: Array
    rewards_n: Array
    old_logps_nc: Array | None = None
    ref_logps_nc: Array | None = None
    values_nc: Array | None = None
    old_values_nc: Array | None = None
    entropy_nc: Array | None = None
    valid_n: Array | None = None
    weight_n: Array | None = None
    extras: dict[str, Any] = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class LossOutput:
    """Per-example loss (0 on filler), metrics as (sum, count) pairs, and the returned state.

    The training loss is `metrics["loss"][0] / metrics["loss"][1]` (see `mean_loss`).
    """

    loss_p: Array
    metrics: Metrics
    state: Any = None


@flax.struct.dataclass
class PairLogps:
    """Reduced sequence log-probs of a pair: [P] each; ref_* are 0 when reference-free."""

    pol_w_p: Array
    pol_l_p: Array
    ref_w_p: Array
    ref_l_p: Array
    len_w_p: Array
    len_l_p: Array

    @property
    def ratio_w_p(self) -> Array:
        """D_w = L(y_w) - L_ref(y_w) under the chosen reduction."""
        return self.pol_w_p - self.ref_w_p

    @property
    def ratio_l_p(self) -> Array:
        """D_l = L(y_l) - L_ref(y_l) under the chosen reduction."""
        return self.pol_l_p - self.ref_l_p


def pairwise_from_interleaved(logps_qc: Array, mask_qc: Array, ref_logps_qc: Array | None = None,
                              **fields: Any) -> PairwiseInputs:
    """PairwiseInputs from the batch layout: sequence 2p is pair p's chosen, 2p + 1 its rejected.

    `fields` are the other PairwiseInputs fields (valid_p, weight_p, extras, ...). A reshape,
    not a strided slice, so a batch sharded over pairs stays sharded the same way.
    """
    def split(x_qc):
        if x_qc is None:
            return None, None
        x_p2c = x_qc.reshape(x_qc.shape[0] // 2, 2, *x_qc.shape[1:])
        return x_p2c[:, 0], x_p2c[:, 1]

    (lw, ll), (mw, ml), (rw, rl) = split(logps_qc), split(mask_qc), split(ref_logps_qc)
    return PairwiseInputs(logps_w_pc=lw, logps_l_pc=ll, mask_w_pc=mw, mask_l_pc=ml,
                          ref_logps_w_pc=rw, ref_logps_l_pc=rl, **fields)


def listwise_from_flat(logps_qc: Array, mask_qc: Array, scores_pk: Array,
                       ref_logps_qc: Array | None = None, **fields: Any) -> ListwiseInputs:
    """ListwiseInputs from the batch layout: Q = P * K sequences, list by list, in order."""
    p, k = scores_pk.shape

    def fold(x_qc):
        return None if x_qc is None else x_qc.reshape(p, k, *x_qc.shape[1:])

    return ListwiseInputs(logps_pkc=fold(logps_qc), mask_pkc=fold(mask_qc), scores_pk=scores_pk,
                          ref_logps_pkc=fold(ref_logps_qc), **fields)


def f32(x: Array | None) -> Array | None:
    """Cast to float32 (accumulate in fp32 whatever the model's dtype)."""
    return None if x is None else jnp.asarray(x, jnp.float32)


def ones_like_lead(x: Array, value: Array | None) -> Array:
    """`value` in fp32, or ones shaped like the leading axis of `x` when None."""
    return jnp.ones(x.shape[:1], jnp.float32) if value is None else f32(value)


def seq_reduce(logps_xc: Array | None, mask_xc: Array, token_weight_xc: Array | None = None,
               reduction: str = "sum") -> Array:
    """Masked reduction over the last axis: `sum_t w_t m_t l_t` ("sum") or that over `|y|` ("mean").

    `logps_xc` None means a zero reference (reference-free). Token weights scale each token's
    contribution (LD-DPO); lengths stay the plain token count. Empty rows give 0, never nan.
    """
    mask_xc = f32(mask_xc)
    if logps_xc is None:
        return jnp.zeros(mask_xc.shape[:-1], jnp.float32)
    weight_xc = mask_xc if token_weight_xc is None else mask_xc * f32(token_weight_xc)
    # where, not multiply: garbage (inf/nan) on masked positions must not leak into sums.
    total_x = jnp.sum(jnp.where(weight_xc != 0, f32(logps_xc) * weight_xc, 0.0), axis=-1)
    if reduction == "sum":
        return total_x
    if reduction == "mean":
        return total_x / seq_len(mask_xc)
    raise ValueError(f"unknown reduction {reduction!r}; known: 'sum', 'mean'")


def seq_len(mask_xc: Array) -> Array:
    """Token count `|y|`, at least 1 so empty (filler) rows divide safely."""
    return jnp.maximum(jnp.sum(f32(mask_xc), axis=-1), 1.0)


def pair_logps(inputs: PairwiseInputs, reduction: str = "sum") -> PairLogps:
    """Sequence log-probs L (sum) or Lbar (mean) of both sides, policy and reference."""
    def red(logps_pc, mask_pc, tw_pc):
        return seq_reduce(logps_pc, mask_pc, tw_pc, reduction)

    return PairLogps(
        pol_w_p=red(inputs.logps_w_pc, inputs.mask_w_pc, inputs.token_weight_w_pc),
        pol_l_p=red(inputs.logps_l_pc, inputs.mask_l_pc, inputs.token_weight_l_pc),
        ref_w_p=red(inputs.ref_logps_w_pc, inputs.mask_w_pc, inputs.token_weight_w_pc),
        ref_l_p=red(inputs.ref_logps_l_pc, inputs.mask_l_pc, inputs.token_weight_l_pc),
        len_w_p=seq_len(inputs.mask_w_pc),
        len_l_p=seq_len(inputs.mask_l_pc),
    )


def ld_token_weights(mask_w_pc: Array, mask_l_pc: Array, alpha: float) -> tuple[Array, Array]:
    """LD-DPO token weights: 1 on the first `min(|y_w|, |y_l|)` tokens, `alpha` after."""
    shared_p = jnp.minimum(jnp.sum(f32(mask_w_pc), -1), jnp.sum(f32(mask_l_pc), -1))

    def weights(mask_pc):
        rank_pc = jnp.cumsum(f32(mask_pc), axis=-1)  # 1-based index among real tokens
        return jnp.where(rank_pc <= shared_p[:, None], 1.0, jnp.float32(alpha))

    return weights(mask_w_pc), weights(mask_l_pc)


def metric(values_x: Array, valid_x: Array) -> tuple[Array, Array]:
    """(sum over valid entries, number of valid entries), fp32, filler excluded exactly."""
    valid_x = f32(valid_x)
    return jnp.sum(jnp.where(valid_x > 0, f32(values_x), 0.0)), jnp.sum(valid_x)


def finish_loss(loss_x: Array, valid_x: Array, weight_x: Array | None) -> Array:
    """Per-example loss with filler set to exactly 0 and per-example weights applied."""
    loss_x = f32(loss_x)
    if weight_x is not None:
        loss_x = loss_x * f32(weight_x)
    return jnp.where(f32(valid_x) > 0, loss_x, 0.0)


def reward_metrics(reward_w_p: Array, reward_l_p: Array, valid_p: Array) -> Metrics:
    """Chosen/rejected reward, margin and accuracy metrics of a batch of pairs (no gradient)."""
    reward_w_p = jax.lax.stop_gradient(reward_w_p)
    reward_l_p = jax.lax.stop_gradient(reward_l_p)
    return {
        "rewards/chosen": metric(reward_w_p, valid_p),
        "rewards/rejected": metric(reward_l_p, valid_p),
        "rewards/margin": metric(reward_w_p - reward_l_p, valid_p),
        "rewards/accuracy": metric((reward_w_p > reward_l_p).astype(jnp.float32), valid_p),
    }


def pair_output(loss_p: Array, inputs: PairwiseInputs, seq: PairLogps, reward_w_p: Array,
                reward_l_p: Array, state: Any = None, extra: Metrics | None = None) -> LossOutput:
    """LossOutput for a pairwise loss with the standard reward / log-prob metrics."""
    valid_p = ones_like_lead(inputs.logps_w_pc, inputs.valid_p)
    loss_p = finish_loss(loss_p, valid_p, inputs.weight_p)
    reward_w_p = jax.lax.stop_gradient(reward_w_p)
    reward_l_p = jax.lax.stop_gradient(reward_l_p)
    metrics = {
        "loss": metric(loss_p, valid_p),
        **reward_metrics(reward_w_p, reward_l_p, valid_p),
        "logps/chosen": metric(jax.lax.stop_gradient(seq.pol_w_p), valid_p),
        "logps/rejected": metric(jax.lax.stop_gradient(seq.pol_l_p), valid_p),
    }
    if inputs.ref_logps_w_pc is not None:
        metrics["ref_logps/chosen"] = metric(seq.ref_w_p, valid_p)
        metrics["ref_logps/rejected"] = metric(seq.ref_l_p, valid_p)
    metrics.update(extra or {})
    return LossOutput(loss_p=loss_p, metrics=metrics, state=state)


def mean_loss(out: LossOutput) -> Array:
    """The scalar training loss: sum of per-example losses over the number of real examples."""
    total, count = out.metrics["loss"]
    return total / jnp.maximum(count, 1.0)


def metric_values(metrics: Metrics) -> dict[str, Array]:
    """Turn (sum, count) pairs into means (for logging; counts of 0 give 0)."""
    return {k: s / jnp.maximum(c, 1.0) for k, (s, c) in metrics.items()}


def gather_global(x: Array) -> Array:
    """x with its example axis unsharded, for ops that need the whole batch at once (sort).

    On meshes with Auto axes XLA already inserts the all-gather; Explicit axes refuse a sort
    over a sharded dimension, so reshard to replicated there. Values are unchanged either way.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or all(axis is None for axis in spec):
        return x
    explicit = set(sharding.mesh.explicit_axes)
    named = {a for entry in spec if entry is not None
             for a in (entry if isinstance(entry, tuple) else (entry,))}
    if named & explicit:
        return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
    return x


def log1mexp(x: Array) -> Array:
    """`log(1 - exp(x))` for x <= 0, stable on both sides of -log 2; x is clamped below 0."""
    # Clamp: a log-prob of exactly 0 (or a filler row) would give -inf and a nan gradient.
    x = jnp.minimum(x, -1e-6)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def require(container: dict, key: str, loss: str) -> Array:
    """`container[key]` or a clear error naming the loss and the missing input."""
    if key not in container or container[key] is None:
        raise KeyError(f"loss {loss!r} needs inputs.extras[{key!r}]; got keys {sorted(container)}")
    return container[key]


def running_mean_update(state: Any, values_x: Array, valid_x: Array) -> dict:
    """Running mean over all values seen so far: {"mean", "count"}, updated with this batch.

    Plain sums over the full (global) arrays, so every shard sees the same statistic.
    """
    state = state if state is not None else {"mean": jnp.float32(0.0), "count": jnp.float32(0.0)}
    values_x = jax.lax.stop_gradient(f32(values_x))
    batch_sum, batch_count = metric(values_x, valid_x)
    count = state["count"] + batch_count
    mean = (state["mean"] * state["count"] + batch_sum) / jnp.maximum(count, 1.0)
    return {"mean": jnp.where(count > 0, mean, state["mean"]), "count": count}

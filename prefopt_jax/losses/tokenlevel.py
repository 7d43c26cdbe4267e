"""Token-level objectives from the Q* view (docs/objectives.md): tgdpo, aligndistil, cpl.

Per-token weights (token rewards, discounts) enter through `seq_reduce`'s token weights, so
sequence sums are still formed in one place.

Shape letters: `p` pairs, `n` sequences, `c` completion positions, `v` vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prefopt_jax.losses.base import (Array, DistillInputs, LossOutput, PairLogps, PairwiseInputs,
                                     f32, finish_loss, metric, ones_like_lead, pair_output,
                                     seq_len, seq_reduce)
from prefopt_jax.losses.registry import register


def _times(weight_pc: Array, base_pc: Array | None) -> Array:
    """Combine a loss's own token weights with any set by a modifier (LD-DPO)."""
    return weight_pc if base_pc is None else weight_pc * f32(base_pc)


def weighted_pair(inputs: PairwiseInputs, weight_w_pc: Array, weight_l_pc: Array,
                  use_ref: bool = True) -> PairLogps:
    """Token-weighted sequence sums `sum_t w_t l_t` of both sides (policy and reference)."""
    tw_w = _times(weight_w_pc, inputs.token_weight_w_pc)
    tw_l = _times(weight_l_pc, inputs.token_weight_l_pc)
    ref_w = inputs.ref_logps_w_pc if use_ref else None
    ref_l = inputs.ref_logps_l_pc if use_ref else None
    return PairLogps(
        pol_w_p=seq_reduce(inputs.logps_w_pc, inputs.mask_w_pc, tw_w),
        pol_l_p=seq_reduce(inputs.logps_l_pc, inputs.mask_l_pc, tw_l),
        ref_w_p=seq_reduce(ref_w, inputs.mask_w_pc, tw_w),
        ref_l_p=seq_reduce(ref_l, inputs.mask_l_pc, tw_l),
        len_w_p=seq_len(inputs.mask_w_pc),
        len_l_p=seq_len(inputs.mask_l_pc),
    )


@register("tgdpo", inputs="pairwise", reference=True, needs=("token_rewards",),
          paper=("TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference "
                 "Optimization"))
def tgdpo(inputs: PairwiseInputs, state: Any = None, *, beta: float = 0.1,
          alpha: float = 0.5) -> LossOutput:
    """TGDPO: `-log s(sum_t b(1 + a rhat^w_t) d^w_t - sum_t b(1 - a rhat^l_t) d^l_t)`.

    rhat: frozen per-token rewards from a DPO model in `token_rewards_w_pc` / `_l_pc`
    (no gradient).
    """
    if inputs.token_rewards_w_pc is None or inputs.token_rewards_l_pc is None:
        raise ValueError("tgdpo needs token_rewards_w_pc and token_rewards_l_pc")
    rhat_w = jax.lax.stop_gradient(f32(inputs.token_rewards_w_pc))
    rhat_l = jax.lax.stop_gradient(f32(inputs.token_rewards_l_pc))
    seq = weighted_pair(inputs, beta * (1.0 + alpha * rhat_w), beta * (1.0 - alpha * rhat_l))
    r_w, r_l = seq.ratio_w_p, seq.ratio_l_p
    return pair_output(-jax.nn.log_sigmoid(r_w - r_l), inputs, seq, r_w, r_l, state)


def _discounts(mask_pc: Array, gamma: float) -> Array:
    """`gamma^t`, t the 0-based index among the real tokens of the segment."""
    t_pc = jnp.maximum(jnp.cumsum(f32(mask_pc), axis=-1) - 1.0, 0.0)
    return jnp.power(jnp.float32(gamma), t_pc)


def _cpl(inputs: PairwiseInputs, state: Any, alpha: float, lam: float, gamma: float,
         use_ref: bool) -> LossOutput:
    """CPL core: `S = sum_t gamma^t alpha x_t`, loss `softplus(lam S- - S+)`."""
    seq = weighted_pair(inputs, alpha * _discounts(inputs.mask_w_pc, gamma),
                        alpha * _discounts(inputs.mask_l_pc, gamma), use_ref)
    s_pos, s_neg = seq.ratio_w_p, seq.ratio_l_p
    loss_p = jax.nn.softplus(lam * s_neg - s_pos)
    return pair_output(loss_p, inputs, seq, s_pos, s_neg, state)


@register("cpl", inputs="pairwise", reference=False,
          paper="Contrastive Preference Learning: Learning from Human Feedback without RL")
def cpl(inputs: PairwiseInputs, state: Any = None, *, alpha: float = 0.1, lam: float = 0.5,
        gamma: float = 1.0) -> LossOutput:
    """CPL: `S = sum_t gamma^t alpha log pi(a_t|s_t)`; `softplus(lam S- - S+)`; no reference.

    sigma+ is the chosen segment (w), sigma- the rejected one (l).
    """
    inputs = inputs.replace(ref_logps_w_pc=None, ref_logps_l_pc=None)
    return _cpl(inputs, state, alpha, lam, gamma, use_ref=False)


@register("cpl_kl", inputs="pairwise", reference=True,
          paper="Contrastive Preference Learning: Learning from Human Feedback without RL")
def cpl_kl(inputs: PairwiseInputs, state: Any = None, *, alpha: float = 0.2, lam: float = 0.75,
           gamma: float = 1.0) -> LossOutput:
    """CPL-KL: CPL with `log pi - log pi_ref` per token in S; `softplus(lam S- - S+)`."""
    return _cpl(inputs, state, alpha, lam, gamma, use_ref=True)


def _log_softmax32(logits_xv: Array, temperature: float = 1.0) -> Array:
    return jax.nn.log_softmax(f32(logits_xv) / temperature, axis=-1)


def aligndistil_terms(logits_xv: Array, dpo_logits_xv: Array, ref_logits_xv: Array, *,
                      beta2: float = 10.0, temperature: float = 1.0) -> dict[str, Array]:
    """AlignDistil's per-token terms from full-vocabulary logits `[..., V]` (float32).

    Teacher logits `z~ = z_dpo + w_t (z_dpo - z_ref)`, `w_t = b2 sum_v |p_dpo - p_ref| + 1e-3`;
    returns `kl = KL(pi_theta(.|s_t) || softmax(z~_t / T))` (gradient through the student only)
    and the frozen `teacher_weight = w_t`. The engine calls this on each chunk of positions.
    """
    dpo_logp = _log_softmax32(dpo_logits_xv)
    ref_logp = _log_softmax32(ref_logits_xv)
    w_x = beta2 * jnp.sum(jnp.abs(jnp.exp(dpo_logp) - jnp.exp(ref_logp)), axis=-1) + 1e-3
    z_dpo = f32(dpo_logits_xv)
    teacher_xv = z_dpo + w_x[..., None] * (z_dpo - f32(ref_logits_xv))
    teacher_logp = jax.lax.stop_gradient(_log_softmax32(teacher_xv, temperature))
    student_logp = _log_softmax32(logits_xv)
    kl_x = jnp.sum(jnp.exp(student_logp) * (student_logp - teacher_logp), axis=-1)
    return {"kl": kl_x, "teacher_weight": jax.lax.stop_gradient(w_x)}


@register("aligndistil", inputs="distill", reference=True, needs=("teacher_logits",),
          token_terms=aligndistil_terms,
          paper="AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation")
def aligndistil(inputs: DistillInputs, state: Any = None, *, beta: float = 0.1,
                beta2: float = 10.0, temperature: float = 1.0) -> LossOutput:
    """AlignDistil: `(1/|y|) sum_t (b / w_t) KL(pi_theta(.|s_t) || softmax(z~_t / T))`.

    Teacher logits `z~ = z_dpo + w_t (z_dpo - z_ref)`, `w_t = b2 sum_v |p_dpo - p_ref| + 1e-3`;
    the teacher and w_t are frozen. Full-vocabulary, fp32: `beta2` and `temperature` enter
    `aligndistil_terms`, which the engine evaluates per token in its log-prob chunks.
    """
    mask_nc = f32(inputs.mask_nc)
    w_nc = jax.lax.stop_gradient(f32(inputs.teacher_weight_nc))
    kl_nc = f32(inputs.kl_nc)
    loss_n = seq_reduce(beta / w_nc * kl_nc, mask_nc, None, "mean")
    valid_n = ones_like_lead(mask_nc, inputs.valid_n)
    loss_n = finish_loss(loss_n, valid_n, inputs.weight_n)
    tokens_nc = mask_nc * valid_n[:, None]
    metrics = {
        "loss": metric(loss_n, valid_n),
        "aligndistil/kl": metric(jax.lax.stop_gradient(kl_nc), tokens_nc),
        "aligndistil/w": metric(w_nc, tokens_nc),
    }
    return LossOutput(loss_p=loss_n, metrics=metrics, state=state)

"""Composable loss modifiers: each takes a loss (or its registry name) and returns a loss.

- `mix`: weighted sum of several losses (MPO); configs reach it as `AlgoConfig.mix`.
- `f_divergence`: psi applied to each log-ratio before forming h (margin losses only).
- `wpo`: multiply each pair's loss by frozen WPO weights `w_w * w_l`.
- `ld_dpo`: length-desensitised sums via token weights (policy AND reference).
- `reference_free`: drop the reference (its log-probs read as 0).

`MODIFIERS` declares each of the last four for configs (`AlgoConfig.modifiers`): what it wraps,
what it adds to the objective's needs, and what it refuses (`losses.objective.compose`).

Shape letters: `p` pairs, `c` completion positions, `v` vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from prefopt_jax.losses.base import (Array, LossOutput, PairwiseInputs, f32, ld_token_weights,
                                     metric, ones_like_lead, seq_reduce)
from prefopt_jax.losses.pairwise import MarginLoss
from prefopt_jax.losses.registry import get, register

LossFn = Callable[..., LossOutput]


def _resolve(loss: str | LossFn) -> LossFn:
    return get(loss) if isinstance(loss, str) else loss


def _name(loss: str | LossFn) -> str:
    return loss if isinstance(loss, str) else getattr(loss, "__name__", repr(loss))


def mix(components: Sequence[tuple]) -> LossFn:
    """Weighted sum `sum_k w_k loss_k` of losses given as (loss, weight[, hyper]) tuples.

    Per-example losses add, so the batch mean is `sum_k w_k mean(loss_k)`. State is a tuple of
    the components' states (None = all None); metrics are prefixed `"{name}/"`.
    """
    parts = [(_name(c[0]), _resolve(c[0]), float(c[1]), dict(c[2]) if len(c) > 2 else {})
             for c in components]
    names = [p[0] for p in parts]
    if len(set(names)) != len(names):  # the same loss twice: keep metric prefixes distinct
        parts = [(f"{i}.{n}", fn, w, h) for i, (n, fn, w, h) in enumerate(parts)]

    def mixed(inputs: Any, state: Any = None) -> LossOutput:
        states = state if state is not None else (None,) * len(parts)
        loss_p, metrics, new_states = 0.0, {}, []
        for (name, fn, weight, hyper), sub_state in zip(parts, states):
            out = fn(inputs, sub_state, **hyper)
            loss_p = loss_p + weight * out.loss_p
            metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
            new_states.append(out.state)
        count = metrics[f"{parts[0][0]}/loss"][1]
        metrics["loss"] = (jnp.sum(loss_p), count)
        return LossOutput(loss_p=loss_p, metrics=metrics, state=tuple(new_states))

    mixed.__name__ = "mix(" + ", ".join(f"{n}*{w}" for n, _, w, _ in parts) + ")"
    return mixed


mpo = register("mpo", inputs="pairwise", reference=True, coupling="batch",
               paper="Enhancing the Reasoning Ability of Multimodal Large Language Models via "
                     "Mixed Preference Optimization")(
    mix([("dpo", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]))
mpo.__doc__ = "MPO: `0.8 dpo + 0.2 bco_pair + 1.0 sft` (a `mix`; state is a 3-tuple)."

# Exponents are clamped so psi stays finite (and its gradient nan-free) at extreme log-ratios.
_EXP_CLAMP = 50.0


def _psi_reverse_kl(d: Array, alpha: float) -> Array:
    return d


def _psi_forward_kl(d: Array, alpha: float) -> Array:
    return 1.0 - jnp.exp(jnp.minimum(-d, _EXP_CLAMP))


def _psi_js(d: Array, alpha: float) -> Array:
    return jnp.log(2.0) + jax.nn.log_sigmoid(d)


def _psi_alpha(d: Array, alpha: float) -> Array:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha-divergence needs alpha in (0, 1), got {alpha}")
    return (1.0 - jnp.exp(jnp.minimum(-alpha * d, _EXP_CLAMP))) / alpha


PSI = {"reverse_kl": _psi_reverse_kl, "forward_kl": _psi_forward_kl, "js": _psi_js,
       "alpha": _psi_alpha}
F_DIVERGENCE_LOSSES = ("dpo", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm")


def f_divergence(loss: str | LossFn, divergence: str = "reverse_kl",
                 alpha: float = 0.5) -> MarginLoss:
    """Beyond reverse KL: replace each log-ratio D by psi(D) before forming h.

    reverse_kl `D`; forward_kl `1 - exp(-D)`; js `log 2 + log s(D)`; alpha
    `(1 - exp(-alpha D))/alpha`. Only for the margin losses in F_DIVERGENCE_LOSSES (apply it
    before wrapping modifiers such as wpo / ld_dpo).
    """
    fn = _resolve(loss)
    if not isinstance(fn, MarginLoss):
        raise ValueError(f"f_divergence applies only to losses of the margin h "
                         f"({', '.join(F_DIVERGENCE_LOSSES)}), not {_name(loss)!r}")
    if divergence not in PSI:
        raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join(PSI)}")
    psi = PSI[divergence]
    psi(jnp.zeros(()), alpha)  # validate alpha now, not at trace time
    return dataclasses.replace(fn, psi=lambda d: psi(d, alpha),
                               name=f"{fn.name}[{divergence}]")


def wpo_log_weight(logps_pc: Array, mask_pc: Array, logits_pcv: Array | None,
                   log_sum_p2_pc: Array | None) -> Array:
    """`mean_t(l_t - log sum_v p_v^2)` per sequence (the log of one side's WPO weight)."""
    if log_sum_p2_pc is None:
        if logits_pcv is None:
            raise ValueError("wpo needs logits_*_pcv or extras['log_sum_p2_*_pc']")
        logp_pcv = jax.nn.log_softmax(f32(logits_pcv), axis=-1)
        log_sum_p2_pc = jax.nn.logsumexp(2.0 * logp_pcv, axis=-1)
    return seq_reduce(f32(logps_pc) - f32(log_sum_p2_pc), mask_pc, None, "mean")


def wpo(loss: str | LossFn) -> LossFn:
    """WPO: multiply each pair's loss by `w_w * w_l`, `w = exp(mean_t(l_t - log sum_v p_v^2))`.

    The weights are frozen (stop_gradient). `sum_v p_v^2` comes from `logits_w_pcv` /
    `logits_l_pcv` or, precomputed in chunks, from `extras["log_sum_p2_w_pc"]` / `["..._l_pc"]`.
    """
    fn = _resolve(loss)

    def weighted(inputs: PairwiseInputs, state: Any = None, **hyper) -> LossOutput:
        out = fn(inputs, state, **hyper)
        log_w = (wpo_log_weight(inputs.logps_w_pc, inputs.mask_w_pc, inputs.logits_w_pcv,
                                inputs.extras.get("log_sum_p2_w_pc"))
                 + wpo_log_weight(inputs.logps_l_pc, inputs.mask_l_pc, inputs.logits_l_pcv,
                                  inputs.extras.get("log_sum_p2_l_pc")))
        weight_p = jax.lax.stop_gradient(jnp.exp(jnp.minimum(log_w, _EXP_CLAMP)))
        loss_p = out.loss_p * weight_p
        valid_p = ones_like_lead(inputs.logps_w_pc, inputs.valid_p)
        metrics = {**out.metrics, "loss": metric(loss_p, valid_p),
                   "wpo/weight": metric(weight_p, valid_p)}
        return LossOutput(loss_p=loss_p, metrics=metrics, state=out.state)

    weighted.__name__ = f"wpo({_name(loss)})"
    return weighted


def _times(new_pc: Array, old_pc: Array | None) -> Array:
    return new_pc if old_pc is None else new_pc * f32(old_pc)


def ld_dpo(loss: str | LossFn, alpha: float) -> LossFn:
    """LD-DPO: `Lhat(y) = sum_{t<=l_p} l_t + alpha sum_{t>l_p} l_t`, l_p = min(|y_w|, |y_l|).

    Applied to policy AND reference through token weights (see `base.ld_token_weights`), so any
    loss built on `pair_logps` sums sees the desensitised sums; alpha = 1 is the plain loss.
    """
    fn = _resolve(loss)

    def desensitised(inputs: PairwiseInputs, state: Any = None, **hyper) -> LossOutput:
        tw_w, tw_l = ld_token_weights(inputs.mask_w_pc, inputs.mask_l_pc, alpha)
        inputs = inputs.replace(token_weight_w_pc=_times(tw_w, inputs.token_weight_w_pc),
                                token_weight_l_pc=_times(tw_l, inputs.token_weight_l_pc))
        return fn(inputs, state, **hyper)

    desensitised.__name__ = f"ld_dpo({_name(loss)}, alpha={alpha})"
    return desensitised


def reference_free(loss: str | LossFn) -> LossFn:
    """Reference-free: `L_ref = 0` (the reference log-probs are dropped before the loss)."""
    fn = _resolve(loss)

    def free(inputs: PairwiseInputs, state: Any = None, **hyper) -> LossOutput:
        return fn(inputs.replace(ref_logps_w_pc=None, ref_logps_l_pc=None), state, **hyper)

    free.__name__ = f"reference_free({_name(loss)})"
    return free


@dataclasses.dataclass(frozen=True)
class Modifier:
    """A modifier as configs name it: `AlgoConfig.modifiers = [(name, params), ...]`.

    Attributes:
      apply: `apply(loss, **params) -> loss`.
      inputs: the inputs types it can wrap.
      needs: what it adds to the objective's needs (`registry.NEEDS`).
      drops_reference: the modified objective reads no reference.
      check: `check(fn, info) -> reason or None`, refusing objectives it does not apply to.
    """

    apply: Callable[..., LossFn]
    inputs: tuple[str, ...] = ("pairwise",)
    needs: tuple[str, ...] = ()
    drops_reference: bool = False
    check: Callable[[LossFn, Any], str | None] | None = None

    def refuses(self, fn: LossFn, info) -> str | None:
        """Why this modifier cannot wrap `fn` (declared `info`), or None when it can."""
        if info.inputs not in self.inputs:
            return (f"it reads {' or '.join(self.inputs)} inputs, the objective reads "
                    f"{info.inputs} inputs")
        return self.check(fn, info) if self.check else None


def _margin_only(fn: LossFn, info) -> str | None:
    if isinstance(fn, MarginLoss):
        return None
    return (f"f-divergences replace the log-ratios of the margin losses "
            f"({', '.join(F_DIVERGENCE_LOSSES)}), applied before any other modifier")


def _with_reference(fn: LossFn, info) -> str | None:
    return None if info.reference else "the objective reads no reference already"


MODIFIERS = {
    "f_divergence": Modifier(f_divergence, check=_margin_only),
    "wpo": Modifier(wpo, needs=("token_stats",)),
    "ld_dpo": Modifier(ld_dpo),
    "reference_free": Modifier(reference_free, drops_reference=True, check=_with_reference),
}

"""Unpaired preference losses: one labelled completion per example (docs/objectives.md).

Shape letters: `n` examples, `c` completion positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prefopt_jax.losses.base import (Array, LossOutput, Metrics, UnpairedInputs, f32,
                                     finish_loss, metric, ones_like_lead, running_mean_update,
                                     seq_reduce)
from prefopt_jax.losses.registry import register

log_sigmoid = jax.nn.log_sigmoid


def unpaired_log_ratio(inputs: UnpairedInputs) -> tuple[Array, Array]:
    """(L(y), D(y) = L(y) - L_ref(y)) per example, sequence sums."""
    pol_n = seq_reduce(inputs.logps_nc, inputs.mask_nc, inputs.token_weight_nc)
    ref_n = seq_reduce(inputs.ref_logps_nc, inputs.mask_nc, inputs.token_weight_nc)
    return pol_n, pol_n - ref_n


def unpaired_output(loss_n: Array, inputs: UnpairedInputs, pol_n: Array, reward_n: Array,
                    state: Any = None, extra: Metrics | None = None) -> LossOutput:
    """LossOutput with rewards / log-probs split by label (chosen = desirable).

    Unpaired data has no pairs, so there is no accuracy or margin metric.
    """
    valid_n = ones_like_lead(inputs.logps_nc, inputs.valid_n)
    desirable_n = valid_n * f32(inputs.label_n)
    undesirable_n = valid_n * (1.0 - f32(inputs.label_n))
    loss_n = finish_loss(loss_n, valid_n, inputs.weight_n)
    reward_n = jax.lax.stop_gradient(reward_n)
    pol_n = jax.lax.stop_gradient(pol_n)
    metrics = {
        "loss": metric(loss_n, valid_n),
        "rewards/chosen": metric(reward_n, desirable_n),
        "rewards/rejected": metric(reward_n, undesirable_n),
        "logps/chosen": metric(pol_n, desirable_n),
        "logps/rejected": metric(pol_n, undesirable_n),
    }
    if inputs.ref_logps_nc is not None:
        ref_n = seq_reduce(inputs.ref_logps_nc, inputs.mask_nc, inputs.token_weight_nc)
        metrics["ref_logps/chosen"] = metric(ref_n, desirable_n)
        metrics["ref_logps/rejected"] = metric(ref_n, undesirable_n)
    metrics.update(extra or {})
    return LossOutput(loss_p=loss_n, metrics=metrics, state=state)


def kto_reference_point(inputs: UnpairedInputs) -> Array:
    """KTO's z0 = max(0, mean_i D(y_{i+1} | x_i)) over the GLOBAL batch, no gradient.

    The mismatched completions' log-probs come in `kl_logps_nc`, `kl_ref_logps_nc`,
    `kl_mask_nc` (the engine scores completion i+1 under prompt i). Plain sums over the full
    arrays, so the mean is global under sharding.
    """
    if inputs.kl_logps_nc is None or inputs.kl_mask_nc is None:
        raise ValueError("kto needs kl_logps_nc / kl_ref_logps_nc / kl_mask_nc (completions "
                         "shifted by one within the batch) or an explicit z0=...")
    kl_n = (seq_reduce(inputs.kl_logps_nc, inputs.kl_mask_nc)
            - seq_reduce(inputs.kl_ref_logps_nc, inputs.kl_mask_nc))
    total, count = metric(kl_n, ones_like_lead(inputs.logps_nc, inputs.valid_n))
    return jax.lax.stop_gradient(jnp.maximum(total / jnp.maximum(count, 1.0), 0.0))


@register("kto", inputs="unpaired", reference=True, needs=("mismatched",),
          waived_by={"mismatched": "z0"},
          paper="KTO: Model Alignment as Prospect Theoretic Optimization")
def kto(inputs: UnpairedInputs, state: Any = None, *, beta: float = 0.1,
        lam_desirable: float = 1.0, lam_undesirable: float = 1.0,
        z0: float | None = None) -> LossOutput:
    """KTO: desirable `lam_D (1 - s(b (D - z0)))`, undesirable `lam_U (1 - s(b (z0 - D)))`.

    z0 from `kto_reference_point` unless given explicitly (e.g. z0=0.0 when no mismatched
    completions are scored).
    """
    pol_n, d_n = unpaired_log_ratio(inputs)
    z0 = kto_reference_point(inputs) if z0 is None else jnp.float32(z0)
    loss_n = jnp.where(f32(inputs.label_n) > 0,
                       lam_desirable * (1.0 - jax.nn.sigmoid(beta * (d_n - z0))),
                       lam_undesirable * (1.0 - jax.nn.sigmoid(beta * (z0 - d_n))))
    return unpaired_output(loss_n, inputs, pol_n, beta * d_n, state,
                           {"kto/z0": (z0, jnp.float32(1.0))})


@register("bco", inputs="unpaired", reference=True, coupling="batch",
          paper="Binary Classifier Optimization for Large Language Model Alignment")
def bco(inputs: UnpairedInputs, state: Any = None, *, beta: float = 0.1) -> LossOutput:
    """BCO: r = b D(y); desirable `-log s(r - m)`, undesirable `-log s(-(r - m))`.

    m is the running mean of r over every reward seen (state `{"mean", "count"}`, None starts
    empty), updated with this GLOBAL batch before use, no gradient.
    """
    pol_n, d_n = unpaired_log_ratio(inputs)
    r_n = beta * d_n
    state = running_mean_update(state, r_n, ones_like_lead(inputs.logps_nc, inputs.valid_n))
    m = state["mean"]
    loss_n = jnp.where(f32(inputs.label_n) > 0, -log_sigmoid(r_n - m), -log_sigmoid(m - r_n))
    return unpaired_output(loss_n, inputs, pol_n, r_n, state, {"bco/mean": (m, jnp.float32(1.0))})

"""Reward-model losses, ensemble aggregations and PAR shaping (ALGORITHMS.md section 4).

`bradley_terry` is a loss (`fn(inputs, state=None, **hyper) -> LossOutput`); the ensemble
aggregations and `par` are registered too but map reward arrays to reward arrays.

Shape letters: `p` pairs, `n` examples, `e` ensemble members, `m` reference completions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prefopt_jax.losses.base import (Array, LossOutput, RewardPairInputs, f32, finish_loss,
                                     metric, ones_like_lead, reward_metrics, seq_reduce)
from prefopt_jax.losses.registry import register


@register("bradley_terry")
def bradley_terry(inputs: RewardPairInputs, state: Any = None, *,
                  center_coef: float = 0.0) -> LossOutput:
    """Bradley-Terry: `-log s(r_w - r_l - margin) + c (r_w + r_l)^2` (c > 0 centres rewards)."""
    r_w, r_l = f32(inputs.reward_w_p), f32(inputs.reward_l_p)
    margin_p = jnp.zeros_like(r_w) if inputs.margin_p is None else f32(inputs.margin_p)
    loss_p = -jax.nn.log_sigmoid(r_w - r_l - margin_p) + center_coef * jnp.square(r_w + r_l)
    valid_p = ones_like_lead(r_w, inputs.valid_p)
    loss_p = finish_loss(loss_p, valid_p, inputs.weight_p)
    metrics = {"loss": metric(loss_p, valid_p), **reward_metrics(r_w, r_l, valid_p)}
    return LossOutput(loss_p=loss_p, metrics=metrics, state=state)


@register("ensemble_mean")
def ensemble_mean(rewards_en: Array) -> Array:
    """Ensemble mean: `mean_i R_i` over the leading (member) axis."""
    return jnp.mean(f32(rewards_en), axis=0)


@register("wco")
def wco(rewards_en: Array) -> Array:
    """Worst-case optimisation: `min_i R_i` over the leading (member) axis."""
    return jnp.min(f32(rewards_en), axis=0)


@register("uwo")
def uwo(rewards_en: Array, *, lam: float = 0.5) -> Array:
    """Uncertainty-weighted optimisation: `mean_i R_i - lam Var_i R_i` (population variance).

    lam = 0.5 (the spec's best-of-n value); use 0.1 for PPO.
    """
    rewards_en = f32(rewards_en)
    return jnp.mean(rewards_en, axis=0) - lam * jnp.var(rewards_en, axis=0)


@register("par")
def par(rewards_n: Array, ref_rewards_nm: Array, *, k: float = 1.0) -> Array:
    """PAR shaping: `(1/M) sum_m s(k (r(x,y) - r(x, y_ref_m)))` (M = 10 reference samples)."""
    diff_nm = f32(rewards_n)[:, None] - f32(ref_rewards_nm)
    return jnp.mean(jax.nn.sigmoid(k * diff_nm), axis=-1)


def implicit_reward(logps_nc: Array, ref_logps_nc: Array | None, mask_nc: Array,
                    beta: float = 0.1) -> Array:
    """Implicit reward of a DPO policy: `b D(y)` per sequence."""
    return beta * (seq_reduce(logps_nc, mask_nc) - seq_reduce(ref_logps_nc, mask_nc))

"""Reward-model objectives: Bradley-Terry (docs/objectives.md, reward models).

Ensemble aggregations (mean / WCO / UWO) and PAR shaping combine rewards and train nothing, so
they live in `prefopt_jax.rewards.aggregate`, not in this registry.

Shape letters: `p` pairs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prefopt_jax.losses.base import (LossOutput, RewardPairInputs, f32, finish_loss, metric,
                                     ones_like_lead, reward_metrics)
from prefopt_jax.losses.registry import register


@register("bradley_terry", inputs="reward", reference=False,
          paper=("Bradley-Terry reward models (Training language models to follow instructions "
                 "with human feedback)"))
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

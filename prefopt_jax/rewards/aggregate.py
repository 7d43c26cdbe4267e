"""Reward aggregation: ensembles (mean / WCO / UWO), PAR shaping, a DPO policy's implicit reward.

These combine rewards; they train nothing, so they are not objectives (`prefopt_jax.losses`)
but reward functions chosen by name (`AGGREGATIONS`) where rewards are combined: ensemble
scorers (`rewards.scorers`), best-of-N and rejection sampling, the on-policy loops.

Shape letters: `e` ensemble members, `n` examples, `m` reference completions, `c` completion
positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prefopt_jax.losses.base import f32, seq_reduce

Array = jax.Array


def ensemble_mean(rewards_en: Array) -> Array:
    """Ensemble mean: `mean_i R_i` over the leading (member) axis."""
    return jnp.mean(f32(rewards_en), axis=0)


def wco(rewards_en: Array) -> Array:
    """Worst-case optimisation: `min_i R_i` over the leading (member) axis."""
    return jnp.min(f32(rewards_en), axis=0)


def uwo(rewards_en: Array, *, lam: float = 0.5) -> Array:
    """Uncertainty-weighted optimisation: `mean_i R_i - lam Var_i R_i` (population variance).

    lam = 0.5 (the best-of-N value of the reward-ensembles paper); use 0.1 for PPO.
    """
    rewards_en = f32(rewards_en)
    return jnp.mean(rewards_en, axis=0) - lam * jnp.var(rewards_en, axis=0)


# Ensemble aggregations by name: `fn(rewards_en, **params) -> rewards_n`.
AGGREGATIONS = {"mean": ensemble_mean, "wco": wco, "uwo": uwo}


def aggregate(name: str, rewards_en: Array, **params) -> Array:
    """The ensemble aggregation `name` of member rewards `[E, N]`; unknown names are refused."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown ensemble aggregation {name!r}; choose one of "
                         f"{sorted(AGGREGATIONS)}")
    return AGGREGATIONS[name](rewards_en, **params)


def par(rewards_n: Array, ref_rewards_nm: Array, *, k: float = 1.0) -> Array:
    """PAR shaping: `(1/M) sum_m s(k (r(x,y) - r(x, y_ref_m)))` (M = 10 reference samples)."""
    diff_nm = f32(rewards_n)[:, None] - f32(ref_rewards_nm)
    return jnp.mean(jax.nn.sigmoid(k * diff_nm), axis=-1)


def implicit_reward(logps_nc: Array, ref_logps_nc: Array | None, mask_nc: Array,
                    beta: float = 0.1) -> Array:
    """Implicit reward of a DPO policy: `b D(y)` per sequence."""
    return beta * (seq_reduce(logps_nc, mask_nc) - seq_reduce(ref_logps_nc, mask_nc))

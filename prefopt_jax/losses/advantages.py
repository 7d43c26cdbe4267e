"""Advantage estimators for grouped rollouts, a registry by name (the online RL loop's choice).

Rows come in groups of `group_size` consecutive samples of one prompt. An estimator maps the
rewards `r_n` and the validity `v_n` of the rows (0: a filler, or a sample with no reward) to
advantages `A_n`; rows with `v = 0` get `A = 0` and enter no statistic. Formulas (ALGORITHMS.md):

  grpo          (r_i - mean_G r) / (std_G r + eps), std the unbiased std of the group's samples
  dr_grpo       r_i - mean_G r (no std: the constant normaliser lives in the loss)
  rloo          r_i - mean_{j != i} r_j (leave-one-out baseline over the group's other samples)
  reinforce_pp  (r_i - mean_B r) / (std_B r + eps), mean and std over the whole batch; with
                `group_baseline`, r_i - mean_G r is normalised that way instead
  ngrpo         grpo whose mean and std also count a virtual sample of reward `max_reward`

A group whose samples all agree (every reward equal, or one valid sample) gets A = 0 from every
estimator but `ngrpo`, whose virtual sample still makes wrong answers negative.
The GRPO-family losses and RLOO (`losses.rl`) take their advantages from here.
`multi_objective` turns several reward columns into one advantage: each column's own estimate,
weighted and summed (a column that abstains for a row, NaN, counts as not valid there).

Shape letters: `n` rows, `g` groups, `k` members of a group, `m` reward columns.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from prefopt_jax.errors import ConfigError
from prefopt_jax.losses.base import Array, f32

ESTIMATORS: dict[str, Callable] = {}


def estimator(name: str):
    """Registers `fn(rewards_n, valid_n, group_size, **params) -> advantages_n` as `name`."""
    def wrap(fn):
        ESTIMATORS[name] = fn
        return fn
    return wrap


def advantages(name: str, rewards_n: Array, valid_n: Array | None, group_size: int,
               **params) -> Array:
    """The advantages of estimator `name`; ConfigError naming the known ones otherwise."""
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown advantage estimator {name!r}; known: "
                          f"{', '.join(sorted(ESTIMATORS))}")
    n = rewards_n.shape[0]
    if group_size < 1 or n % group_size:
        raise ConfigError(f"group_size {group_size} does not divide the {n} rollouts")
    valid_n = jnp.ones((n,), jnp.float32) if valid_n is None else f32(valid_n)
    valid_n = jnp.where(jnp.isnan(f32(rewards_n)), 0.0, (valid_n > 0).astype(jnp.float32))
    rewards_n = jnp.where(valid_n > 0, f32(rewards_n), 0.0)
    return ESTIMATORS[name](rewards_n, valid_n, group_size, **params) * valid_n


def _groups(x_n: Array, group_size: int) -> Array:
    return x_n.reshape(-1, group_size)


def _rows(x_g: Array, group_size: int) -> Array:
    """A per-group value repeated for each of its rows."""
    return jnp.broadcast_to(x_g[:, None], (x_g.shape[0], group_size)).reshape(-1)


def group_moments(rewards_n: Array, valid_n: Array, group_size: int,
                  extra: float | None = None) -> tuple[Array, Array, Array]:
    """Per row: its group's mean, unbiased std (0 below 2 samples) and count of valid samples.

    `extra` counts one more (virtual) sample of that reward in every group.
    """
    r_gk, v_gk = _groups(rewards_n, group_size), _groups(valid_n, group_size)
    total_g, count_g = jnp.sum(r_gk * v_gk, -1), jnp.sum(v_gk, -1)
    if extra is not None:
        total_g, count_g = total_g + extra, count_g + 1.0
    mean_g = total_g / jnp.maximum(count_g, 1.0)
    sq_g = jnp.sum(jnp.square(r_gk - mean_g[:, None]) * v_gk, -1)
    if extra is not None:
        sq_g = sq_g + jnp.square(extra - mean_g)
    std_g = jnp.where(count_g > 1, jnp.sqrt(sq_g / jnp.maximum(count_g - 1.0, 1.0)), 0.0)
    return (_rows(mean_g, group_size), _rows(std_g, group_size),
            _rows(count_g, group_size))


@estimator("grpo")
def grpo(rewards_n, valid_n, group_size, *, std_eps: float = 1e-4) -> Array:
    mean_n, std_n, _ = group_moments(rewards_n, valid_n, group_size)
    return (rewards_n - mean_n) / (std_n + std_eps)


@estimator("dr_grpo")
def dr_grpo(rewards_n, valid_n, group_size) -> Array:
    mean_n, _, _ = group_moments(rewards_n, valid_n, group_size)
    return rewards_n - mean_n


@estimator("rloo")
def rloo(rewards_n, valid_n, group_size) -> Array:
    mean_n, _, count_n = group_moments(rewards_n, valid_n, group_size)
    others_n = (count_n * mean_n - rewards_n) / jnp.maximum(count_n - 1.0, 1.0)
    return jnp.where(count_n > 1, rewards_n - others_n, 0.0)


@estimator("reinforce_pp")
def reinforce_pp(rewards_n, valid_n, group_size, *, group_baseline: bool = False,
                 std_eps: float = 1e-4) -> Array:
    x_n = rewards_n - group_moments(rewards_n, valid_n, group_size)[0] if group_baseline \
        else rewards_n
    count = jnp.sum(valid_n)
    mean = jnp.sum(x_n * valid_n) / jnp.maximum(count, 1.0)
    var = jnp.sum(jnp.square(x_n - mean) * valid_n) / jnp.maximum(count - 1.0, 1.0)
    return (x_n - mean) / (jnp.sqrt(var) + std_eps)


@estimator("ngrpo")
def ngrpo(rewards_n, valid_n, group_size, *, max_reward: float = 1.0,
          std_eps: float = 1e-4) -> Array:
    mean_n, std_n, _ = group_moments(rewards_n, valid_n, group_size, extra=max_reward)
    return (rewards_n - mean_n) / (std_n + std_eps)


def multi_objective(name: str, rewards_nm: Array, valid_n: Array | None, group_size: int,
                    weights, **params) -> Array:
    """`sum_m w_m A_m`: estimator `name` applied to each reward column, weighted and summed.

    A NaN in column m (its function abstained) leaves that row out of column m's statistics
    and its term; each column is normalised on its own scale before the weighting.
    """
    rewards_nm = f32(rewards_nm)
    if len(weights) != rewards_nm.shape[1]:
        raise ConfigError(f"{len(weights)} weights for {rewards_nm.shape[1]} reward columns")
    return sum(w * advantages(name, rewards_nm[:, m], valid_n, group_size, **params)
               for m, w in enumerate(weights))

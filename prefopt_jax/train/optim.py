"""Optimisers and learning-rate schedules from optax, described by a frozen config.

`OptimConfig` is what gin binds; `build_optimizer` turns it into an `optax.GradientTransformation`
(clipping, the chosen optimiser, weight decay with a mask) outside jit.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from prefopt_jax.train.state import to_f32

NO_DECAY_DEFAULT = ("norm", "bias", "scale", "embed_norm")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and gradient handling.

    Attributes:
      name: one of `OPTIMIZERS` (adamw, adafactor, lion, sgd).
      learning_rate: peak learning rate.
      schedule: one of `SCHEDULES` (cosine, linear, constant), applied after warmup.
      warmup_steps: linear warmup from 0 to the peak.
      total_steps: steps the schedule spans (decay reaches `end_lr_fraction * peak`); None:
        the run's length (`LoopConfig.steps`; an iterative round's steps when each round
        restarts the optimiser), or `DEFAULT_TOTAL_STEPS` outside a run. Set on purpose to
        another length, the run warns once.
      end_lr_fraction: final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay (adamw, lion, adafactor).
      no_decay: parameters whose path contains one of these names get no weight decay.
      b1, b2, eps: moment decays and epsilon (adamw, lion: b1/b2; sgd: b1 is momentum).
      max_grad_norm: clip gradients to this global norm (0 = off).
      fp32_state: keep optimiser state (and the update) in float32 even for bf16 params.
    """

    name: str = "adamw"
    learning_rate: float = 1e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int | None = None
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    no_decay: tuple[str, ...] = NO_DECAY_DEFAULT
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    fp32_state: bool = True


DEFAULT_TOTAL_STEPS = 1000


def for_run(c: OptimConfig, steps: int, what: str = "LoopConfig.steps") -> OptimConfig:
    """The config a run of `steps` optimiser steps uses: an unset schedule length follows it;
    one set to another length is kept, with a warning (once per run)."""
    if c.total_steps is None:
        return dataclasses.replace(c, total_steps=steps)
    if c.total_steps != steps and c.schedule != "constant":
        print(f"warning: OptimConfig.total_steps={c.total_steps} but {what}={steps}: the "
              f"{c.schedule} schedule spans {c.total_steps} steps (unset total_steps to follow "
              f"{what})", flush=True)
    return c


def _cosine(c: OptimConfig, steps: int):
    return optax.cosine_decay_schedule(c.learning_rate, max(steps, 1), alpha=c.end_lr_fraction)


def _linear(c: OptimConfig, steps: int):
    return optax.linear_schedule(c.learning_rate, c.learning_rate * c.end_lr_fraction,
                                 max(steps, 1))


def _constant(c: OptimConfig, steps: int):
    return optax.constant_schedule(c.learning_rate)


SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def schedule(c: OptimConfig) -> optax.Schedule:
    """Warmup (linear from 0) then the configured decay."""
    if c.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {c.schedule!r}; known: {sorted(SCHEDULES)}")
    total = DEFAULT_TOTAL_STEPS if c.total_steps is None else c.total_steps
    decay = SCHEDULES[c.schedule](c, total - c.warmup_steps)
    if c.warmup_steps <= 0:
        return decay
    warm = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
    return optax.join_schedules([warm, decay], [c.warmup_steps])


def decay_mask(params, no_decay: tuple[str, ...]):
    """True for parameters that get weight decay: not 1-d, and no `no_decay` name in the path."""
    def keep(path, leaf):
        names = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path).lower()
        return getattr(leaf, "ndim", 0) > 1 and not any(n in names for n in no_decay)

    return jax.tree_util.tree_map_with_path(keep, params)


def _adamw(c, lr, mask):
    return optax.adamw(lr, c.b1, c.b2, c.eps, weight_decay=c.weight_decay, mask=mask)


def _adafactor(c, lr, mask):
    return optax.adafactor(lr, weight_decay_rate=c.weight_decay or None,
                           weight_decay_mask=mask)


def _lion(c, lr, mask):
    return optax.lion(lr, c.b1, c.b2, weight_decay=c.weight_decay, mask=mask)


def _sgd(c, lr, mask):
    tx = optax.sgd(lr, momentum=c.b1 or None)
    if c.weight_decay:
        tx = optax.chain(optax.add_decayed_weights(c.weight_decay, mask), tx)
    return tx


OPTIMIZERS = {"adamw": _adamw, "adafactor": _adafactor, "lion": _lion, "sgd": _sgd}


def build_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """Clipping (when on) then the named optimiser with the schedule and decay mask."""
    if c.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {c.name!r}; known: {sorted(OPTIMIZERS)}")
    mask = lambda params: decay_mask(params, c.no_decay)  # noqa: E731
    tx = OPTIMIZERS[c.name](c, schedule(c), mask)
    if c.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), tx)
    return tx


def apply_updates(tx: optax.GradientTransformation, params, opt_state, grads,
                  fp32_state: bool):
    """(new params, new optimiser state): one update of `tx`, in float32 when `fp32_state`
    whatever the params' dtype, then cast back to each parameter's dtype (pure)."""
    cast = to_f32 if fp32_state else (lambda tree: tree)
    updates, opt_state = tx.update(cast(grads), opt_state, cast(params))
    new = optax.apply_updates(cast(params), updates)
    return jax.tree.map(lambda n, old: n.astype(old.dtype), new, params), opt_state

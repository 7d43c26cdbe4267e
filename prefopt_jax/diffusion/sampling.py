"""DDPM and DDIM samplers over a sub-sequence of a schedule's levels, with per-step log-probs.

A sampler of ``S`` steps walks the ladder ``tau_0 = T-1 > tau_1 > ... > tau_S = 0``
(``timesteps``: evenly spaced, rounded). Step ``i`` maps ``x_{tau_i}`` to ``x_{tau_{i+1}}`` by the
Gaussian ``N(mu_i, std_i^2 I)``: the action distribution of the denoising MDP whose log-prob
D3PO and DDPO need. With ``a = alpha_bar_{tau_i}``, ``a' = alpha_bar_{tau_{i+1}}``,
``beta = 1 - a / a'`` and ``(x_0, eps)`` implied by the (guided) model output at ``x_{tau_i}``:

- ``ddpm``: the posterior ``q(x_{tau_{i+1}} | x_{tau_i}, x_0)``:
  ``mu = sqrt(a') beta / (1 - a) x_0 + sqrt(1 - beta) (1 - a') / (1 - a) x_t``,
  ``std^2 = (1 - a') / (1 - a) beta``.
- ``ddim`` (Song et al.): ``std = eta sqrt((1 - a') / (1 - a) beta)``,
  ``mu = sqrt(a') x_0 + sqrt(1 - a' - std^2) eps``; eta = 1 is the same step as ddpm, eta = 0
  is deterministic.

The last level is ``t = 0``, not a noiseless ``alpha_bar = 1``, so that every step (the last
included) has a positive variance and a finite log-prob; the images are ``x_0`` of the
schedule, whose remaining noise ``sigma_0 = sqrt(beta_0)`` is about 0.01 for the linear
schedule (as in diffusers' samplers without ``set_alpha_to_one``).

The model is an NNX module, a ``(graphdef, state)`` pair, or any hashable callable
``(x_bhwc, t_b, labels_b) -> prediction_bhwc``; it must have the attributes ``prediction``
(``"epsilon"`` or ``"v"``) and ``image_shape`` (``(H, W, C)``), and ``null_label`` when
guidance is on (``DiT`` has all three).

Shape letters: ``s`` ladder levels (``S + 1``) or steps (``S``), ``b`` batch rows,
``h``, ``w`` image height and width, ``c`` channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.diffusion.model import guided
from prefopt_jax.diffusion.schedules import Schedule, to_x0_eps, x0_to_eps

METHODS = ("ddpm", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to sample; hashable, so it can be a static jit argument.

    Fields:
      method: ``ddpm`` or ``ddim``.
      num_steps: ``S``, the number of denoising steps (at most ``T - 1``).
      eta: DDIM's noise scale in ``[0, 1]`` (ignored by ddpm); 0 is deterministic.
      guidance: classifier-free guidance scale (1: the conditional model alone).
      clip_x0: clip the predicted ``x_0`` to ``[-clip_x0, clip_x0]`` before each step (None: no).
    """

    method: str = "ddim"
    num_steps: int = 20
    eta: float = 0.0
    guidance: float = 1.0
    clip_x0: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"sampler method={self.method!r}; choose from {METHODS}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"sampler eta={self.eta}; must lie in [0, 1]")
        if self.num_steps < 1:
            raise ValueError(f"sampler num_steps={self.num_steps}; need at least 1")

    @property
    def stochastic(self) -> bool:
        """Whether each step draws noise (and so has a log-prob): ddpm, or ddim with eta > 0."""
        return self.method == "ddpm" or self.eta > 0


@flax.struct.dataclass
class Trajectory:
    """One batch of sampled chains.

    Fields:
      images_bhwc: the final images, ``xs_sbhwc[-1]``.
      xs_sbhwc: ``[S + 1, B, H, W, C]``, the start noise then the result of each step.
      timesteps_s: ``[S + 1]`` int32, the level of each entry of ``xs_sbhwc``.
      logps_sb: ``[S, B]`` float32, ``log N(xs[i+1]; mu_i(xs[i]), std_i^2 I)`` summed over pixels;
        None for deterministic DDIM (eta = 0), whose steps have no density.
    """

    images_bhwc: jax.Array
    xs_sbhwc: jax.Array
    timesteps_s: jax.Array
    logps_sb: jax.Array | None


class Coefficients(NamedTuple):
    """Per-step constants ``[S]`` (float32 but ``t``): ``mu = x0 * x_0 + eps * eps + xt * x_t``."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    x0: np.ndarray
    eps: np.ndarray
    xt: np.ndarray
    std: np.ndarray


def timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """The ladder ``[S + 1]`` int32 from ``T - 1`` down to 0, evenly spaced then rounded."""
    if num_steps > schedule.num_steps - 1:
        raise ValueError(f"sampler num_steps={num_steps} exceeds the schedule's "
                         f"{schedule.num_steps} levels less one")
    return np.round(np.linspace(schedule.num_steps - 1, 0, num_steps + 1)).astype(np.int32)


def coefficients(schedule: Schedule, config: SamplerConfig) -> Coefficients:
    """Each step's mean coefficients and std, computed in float64 (module docstring)."""
    levels = timesteps(schedule, config.num_steps)
    a, a_next = schedule.alpha_bars[levels[:-1]], schedule.alpha_bars[levels[1:]]
    beta = 1 - a / a_next
    posterior_var = (1 - a_next) / (1 - a) * beta
    zeros = np.zeros_like(a)
    if config.method == "ddpm":
        c_x0, c_eps = np.sqrt(a_next) * beta / (1 - a), zeros
        c_xt, var = np.sqrt(1 - beta) * (1 - a_next) / (1 - a), posterior_var
    else:
        var = config.eta ** 2 * posterior_var
        c_x0, c_eps, c_xt = np.sqrt(a_next), np.sqrt(np.maximum(1 - a_next - var, 0)), zeros
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return Coefficients(t=levels[:-1], alpha=f32(np.sqrt(a)), sigma=f32(np.sqrt(1 - a)),
                        x0=f32(c_x0), eps=f32(c_eps), xt=f32(c_xt), std=f32(np.sqrt(var)))


def gaussian_logp(x_bhwc: jax.Array, mean_bhwc: jax.Array, std_b: jax.Array) -> jax.Array:
    """``log N(x; mean, std^2 I)`` summed over pixels, float32 ``[B]``."""
    z = (x_bhwc.astype(jnp.float32) - mean_bhwc.astype(jnp.float32)) / std_b[:, None, None, None]
    pixels = math.prod(x_bhwc.shape[1:])
    return (-0.5 * jnp.sum(jnp.square(z), axis=(1, 2, 3))
            - pixels * (jnp.log(std_b) + 0.5 * math.log(2 * math.pi)))


def step_mean_std(model, x_t_bhwc, labels_b, step_b, coefs: Coefficients, config: SamplerConfig):
    """``(mu_bhwc, std_b)`` of the step ``step_b`` (int ``[B]``, an index into the steps) taken
    from ``x_t_bhwc``: one (guided) model call, the same in the sampler and in ``step_logps``."""
    col = lambda c: jnp.asarray(c)[step_b][:, None, None, None]  # noqa: E731
    pred = guided(model, x_t_bhwc, jnp.asarray(coefs.t)[step_b], labels_b, config.guidance)
    alpha, sigma = col(coefs.alpha), col(coefs.sigma)
    x0, eps = to_x0_eps(pred, x_t_bhwc, alpha, sigma, model.prediction)
    if config.clip_x0 is not None:
        x0 = jnp.clip(x0, -config.clip_x0, config.clip_x0)
        eps = x0_to_eps(x_t_bhwc, x0, alpha, sigma)
    mean = col(coefs.x0) * x0 + col(coefs.eps) * eps + col(coefs.xt) * x_t_bhwc
    return mean, jnp.asarray(coefs.std)[step_b]


def sample(model, labels_b, key, *, schedule: Schedule, config: SamplerConfig,
           noise_bhwc=None) -> Trajectory:
    """Sample a batch of chains (jitted; one compile per model structure, schedule, config and
    batch shape).

    Args:
      model: see the module docstring.
      labels_b: int ``[B]`` classes (``null_label`` for unconditional rows).
      key: seeds the start noise (unless given) and every step's noise.
      noise_bhwc: the start ``x_{T-1}``; defaults to standard normal drawn from ``key``. Two
        calls with the same start noise and different keys give D3PO's paired trajectories.
    """
    labels_b = jnp.asarray(labels_b, jnp.int32)
    start_key, step_key = jax.random.split(key)
    if noise_bhwc is None:
        shape = (labels_b.shape[0], *_resolve(model).image_shape)
        noise_bhwc = jax.random.normal(start_key, shape, jnp.float32)
    static, params = _split(model)
    return _sample(static, params, labels_b, jnp.asarray(noise_bhwc, jnp.float32), step_key,
                   schedule=schedule, config=config)


@functools.partial(jax.jit, static_argnames=("static", "schedule", "config"))
def _sample(static, params, labels_b, noise_bhwc, key, *, schedule, config):
    model = _merge(static, params)
    coefs = coefficients(schedule, config)
    batch = labels_b.shape[0]

    def step(x_t, inputs):
        i, k = inputs
        mean, std_b = step_mean_std(model, x_t, labels_b, jnp.full((batch,), i), coefs, config)
        if not config.stochastic:
            return mean, (mean, None)
        x_next = mean + std_b[:, None, None, None] * jax.random.normal(k, x_t.shape, x_t.dtype)
        return x_next, (x_next, gaussian_logp(x_next, mean, std_b))

    steps = jnp.arange(config.num_steps)
    final, (xs, logps_sb) = jax.lax.scan(
        step, noise_bhwc, (steps, jax.random.split(key, config.num_steps)))
    return Trajectory(images_bhwc=final, xs_sbhwc=jnp.concatenate([noise_bhwc[None], xs]),
                      timesteps_s=jnp.asarray(timesteps(schedule, config.num_steps)),
                      logps_sb=logps_sb)


def transition_logps(model, x_t_bhwc, x_next_bhwc, labels_b, step_b, *, schedule: Schedule,
                     config: SamplerConfig) -> jax.Array:
    """``log N(x_next; mu(x_t), std^2 I)`` of one step per row under ``model``, float32 ``[B]``.

    ``step_b`` (int ``[B]``, may be traced) indexes the sampler's steps: step ``i`` goes from
    level ``timesteps[i]`` to ``timesteps[i + 1]``. No sampling and no jit of its own: call it
    inside the training step, with the policy or the reference, for D3PO's and DDPO's ratios.
    Raises ValueError for deterministic DDIM (eta = 0), whose steps have no density.
    """
    if not config.stochastic:
        raise ValueError("deterministic DDIM (eta=0) has no step log-probs; use ddpm or eta > 0")
    mean, std_b = step_mean_std(_resolve(model), x_t_bhwc, jnp.asarray(labels_b, jnp.int32),
                                jnp.asarray(step_b, jnp.int32), coefficients(schedule, config),
                                config)
    return gaussian_logp(x_next_bhwc, mean, std_b)


def step_logps(model, xs_sbhwc, labels_b, *, schedule: Schedule,
               config: SamplerConfig) -> jax.Array:
    """Every step's log-prob ``[S, B]`` of a whole trajectory under ``model``, in one batched
    model call over the ``S * B`` transitions (``transition_logps`` for a subset of steps)."""
    num_s, batch = xs_sbhwc.shape[0] - 1, xs_sbhwc.shape[1]
    if num_s != config.num_steps:
        raise ValueError(f"trajectory of {num_s} steps for a sampler of {config.num_steps}")
    flat = lambda x: x.reshape(num_s * batch, *x.shape[2:])  # noqa: E731
    step_b = jnp.repeat(jnp.arange(num_s), batch)
    labels_flat = jnp.tile(jnp.asarray(labels_b, jnp.int32), num_s)
    logps = transition_logps(model, flat(xs_sbhwc[:-1]), flat(xs_sbhwc[1:]), labels_flat, step_b,
                             schedule=schedule, config=config)
    return logps.reshape(num_s, batch)


def _split(model):
    """``(static, params)``: graphdef and state of a module or pair; a plain callable and None."""
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    if isinstance(model, tuple):
        return model
    return model, None


def _merge(static, params):
    return static if params is None else nnx.merge(static, params)


def _resolve(model):
    """A callable model from a module, a ``(graphdef, state)`` pair or a plain callable."""
    return nnx.merge(*model) if isinstance(model, tuple) else model

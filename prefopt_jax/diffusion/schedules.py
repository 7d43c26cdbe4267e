"""Noise schedules of the forward process and conversions between the model's parameterisations.

Forward process over T discrete levels ``t = 0 .. T-1`` (DDPM's ``t = 1 .. T``, shifted):
``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_bar_t = prod_{s <= t} (1 - beta_s)``,
``alpha_t = sqrt(alpha_bar_t)``, ``sigma_t = sqrt(1 - alpha_bar_t)``.

- ``linear`` (Ho et al.): ``beta_t`` evenly spaced from ``beta_start`` to ``beta_end``.
- ``cosine`` (Nichol & Dhariwal): ``alpha_bar(u) = f(u) / f(0)``, ``f(u) = cos((u + s)/(1 + s)
  pi/2)^2``, discretised as ``beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta)``; so
  ``alpha_bar_t = f((t+1)/T) / f(0)`` wherever the clip is inactive (all but the last level).

The model predicts either the noise (``epsilon``) or the velocity ``v = alpha_t eps - sigma_t x_0``
(Salimans & Ho); the conversions below take ``alpha`` and ``sigma`` already broadcastable to the
images (``Schedule.alpha_sigma`` gives them as ``[B, 1, 1, 1]``) and use ``alpha^2 + sigma^2 = 1``.

Shape letters: ``b`` batch rows, ``h`` height, ``w`` width, ``c`` channels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule; hashable, so it can be a static jit argument.

    The per-level arrays are float64 numpy, computed on demand from the fields.
    """

    kind: str = "cosine"
    num_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_offset: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"noise schedule kind={self.kind!r}; choose from {KINDS}")
        if self.num_steps < 2:
            raise ValueError(f"noise schedule num_steps={self.num_steps}; need at least 2")

    @property
    def betas(self) -> np.ndarray:
        """``beta_t`` for ``t = 0 .. T-1``, float64 ``[T]``."""
        if self.kind == "linear":
            return np.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=np.float64)
        s = self.cosine_offset
        f = lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        u = np.arange(self.num_steps + 1, dtype=np.float64) / self.num_steps
        return np.minimum(1 - f(u[1:]) / f(u[:-1]), self.max_beta)

    @property
    def alpha_bars(self) -> np.ndarray:
        """``alpha_bar_t``, float64 ``[T]``, decreasing from near 1."""
        return np.cumprod(1 - self.betas)

    @property
    def alphas(self) -> np.ndarray:
        """Signal scale ``alpha_t = sqrt(alpha_bar_t)``, float64 ``[T]``."""
        return np.sqrt(self.alpha_bars)

    @property
    def sigmas(self) -> np.ndarray:
        """Noise scale ``sigma_t = sqrt(1 - alpha_bar_t)``, float64 ``[T]``."""
        return np.sqrt(1 - self.alpha_bars)

    def alpha_sigma(self, t_b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(alpha, sigma)`` of levels ``t_b`` (int ``[B]``), float32 ``[B, 1, 1, 1]``."""
        t_b = jnp.asarray(t_b, jnp.int32)
        alpha_b = jnp.asarray(self.alphas, jnp.float32)[t_b]
        sigma_b = jnp.asarray(self.sigmas, jnp.float32)[t_b]
        return alpha_b[:, None, None, None], sigma_b[:, None, None, None]

    def q_sample(self, x0_bhwc: jax.Array, t_b: jax.Array, eps_bhwc: jax.Array) -> jax.Array:
        """Noised images ``x_t = alpha_t x_0 + sigma_t eps`` at levels ``t_b``."""
        alpha, sigma = self.alpha_sigma(t_b)
        return alpha * x0_bhwc + sigma * eps_bhwc


def eps_to_x0(x_t, eps, alpha, sigma):
    """Clean image from noise: ``x_0 = (x_t - sigma eps) / alpha``."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t, x0, alpha, sigma):
    """Noise from clean image: ``eps = (x_t - alpha x_0) / sigma``."""
    return (x_t - alpha * x0) / sigma


def v_target(x0, eps, alpha, sigma):
    """Velocity ``v = alpha eps - sigma x_0``."""
    return alpha * eps - sigma * x0


def v_to_x0(x_t, v, alpha, sigma):
    """Clean image from velocity: ``x_0 = alpha x_t - sigma v``."""
    return alpha * x_t - sigma * v


def v_to_eps(x_t, v, alpha, sigma):
    """Noise from velocity: ``eps = sigma x_t + alpha v``."""
    return sigma * x_t + alpha * v


def to_x0_eps(pred, x_t, alpha, sigma, prediction: str):
    """``(x_0, eps)`` implied by a model output of kind ``prediction`` at ``x_t``."""
    check_prediction(prediction)
    if prediction == "v":
        return v_to_x0(x_t, pred, alpha, sigma), v_to_eps(x_t, pred, alpha, sigma)
    return eps_to_x0(x_t, pred, alpha, sigma), pred


def target(x0, eps, alpha, sigma, prediction: str):
    """The output a ``prediction`` model should give for ``x_t`` made from ``x0`` and ``eps``."""
    check_prediction(prediction)
    return v_target(x0, eps, alpha, sigma) if prediction == "v" else eps


def check_prediction(prediction: str) -> None:
    """Fail loudly on an unknown parameterisation name."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; choose from {PREDICTIONS}")

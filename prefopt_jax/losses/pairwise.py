"""Sequence-level pairwise preference losses (ALGORITHMS.md section 1).

Notation as in the spec: `L(y)` masked sum of token log-probs, `Lbar(y) = L(y)/|y|`,
`D = L - L_ref`, `h = D_w - D_l`, `s` the logistic function.

Shape letters: `p` pairs, `c` completion positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from prefopt_jax.losses.base import (Array, LossOutput, PairwiseInputs, pair_logps, pair_output)
from prefopt_jax.losses.registry import register

log_sigmoid = jax.nn.log_sigmoid


@dataclasses.dataclass(frozen=True)
class MarginLoss:
    """A loss that depends on the pair only through `h = psi(D_w) - psi(D_l)`.

    `phi(h_p, **hyper) -> loss_p` is the margin-to-loss map; `reduction` says whether D is built
    from sums or length means; `psi` is the f-divergence transform (identity = reverse KL), set by
    `modifiers.f_divergence`, which only accepts losses of this kind.
    """

    phi: Callable[..., Array]
    reduction: str = "sum"
    psi: Callable[[Array], Array] | None = None
    name: str = ""

    def __post_init__(self):
        # Frozen dataclass: borrow the margin map's docstring and name for help() and errors.
        object.__setattr__(self, "__doc__", self.phi.__doc__)
        object.__setattr__(self, "__name__", self.name or self.phi.__name__)

    def __call__(self, inputs: PairwiseInputs, state: Any = None, **hyper) -> LossOutput:
        seq = pair_logps(inputs, self.reduction)
        psi = self.psi if self.psi is not None else (lambda d: d)
        d_w, d_l = psi(seq.ratio_w_p), psi(seq.ratio_l_p)
        loss_p = self.phi(d_w - d_l, **hyper)
        beta = hyper.get("beta", self.beta_default)
        return pair_output(loss_p, inputs, seq, beta * d_w, beta * d_l, state)

    @property
    def beta_default(self) -> float:
        return self.phi.__kwdefaults__["beta"]


def margin_loss(name: str, reduction: str = "sum") -> Callable[[Callable], MarginLoss]:
    """Decorator: turn a margin map `phi(h_p, *, beta, ...)` into a registered MarginLoss."""
    def deco(phi: Callable) -> MarginLoss:
        return register(name)(MarginLoss(phi=phi, reduction=reduction, name=name))

    return deco


@margin_loss("dpo")
def dpo(h_p: Array, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Array:
    """DPO (cDPO when e > 0): `-(1-e) log s(b h) - e log s(-b h)`."""
    return (-(1.0 - label_smoothing) * log_sigmoid(beta * h_p)
            - label_smoothing * log_sigmoid(-beta * h_p))


@margin_loss("ipo", reduction="mean")
def ipo(h_p: Array, *, beta: float = 0.1) -> Array:
    """IPO: `(hbar - 1/(2b))^2`, hbar from length-mean log-ratios of policy and reference."""
    return jnp.square(h_p - 1.0 / (2.0 * beta))


@register("simpo")
def simpo(inputs: PairwiseInputs, state: Any = None, *, beta: float = 2.0,
          gamma_beta_ratio: float = 0.25, label_smoothing: float = 0.0) -> LossOutput:
    """SimPO: `-log s(b Lbar(y_w) - b Lbar(y_l) - gamma)`, gamma = ratio * b; reference-free.

    `label_smoothing` e mixes in `-e log s(-(...))` as cDPO does (0 in the paper).
    """
    inputs = inputs.replace(ref_logps_w_pc=None, ref_logps_l_pc=None)
    seq = pair_logps(inputs, "mean")
    reward_w_p, reward_l_p = beta * seq.pol_w_p, beta * seq.pol_l_p
    logits_p = reward_w_p - reward_l_p - gamma_beta_ratio * beta
    loss_p = (-(1.0 - label_smoothing) * log_sigmoid(logits_p)
              - label_smoothing * log_sigmoid(-logits_p))
    return pair_output(loss_p, inputs, seq, reward_w_p, reward_l_p, state)

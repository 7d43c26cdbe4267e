"""Value-augmented sampling (VAS): fit a `ValueHead` to TD(lambda) returns of base-policy samples.

Shape letters: `b` prompts, `n` samples per prompt, `q` flattened samples, `c` completion
positions, `d` model width, `i` optimisation steps.

Convention: `values_qc[q, c] = V(x || y_<=c)`, the value of the state right after completion
token `c`, read from the frozen policy's hidden state at that token; it estimates the terminal
reward `r(x, y)`. With gamma = 1 and only a terminal reward (VAS), the
lambda-return is `R_T = r` at the last token and `R_c = (1 - lam) V_{c+1} + lam R_{c+1}` before
it; the loss is `0.5 (V_c - R_c)^2` averaged over real tokens, targets without gradient
(semi-gradient TD(lambda)). Decoding reads `V(s || a)` the same way
(`search.value_guided_generate`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from prefopt_jax.sampling.scorers import Candidates, completion_forward


def td_lambda_targets(values_qc, rewards_q, mask_qc, lam: float = 0.95):
    """Lambda-returns `[Q, C]` with gamma 1 and a terminal reward; 0 where `mask_qc` is 0."""
    values_qc = jnp.asarray(values_qc, jnp.float32)
    mask_qc = jnp.asarray(mask_qc) > 0
    next_mask_qc = jnp.concatenate([mask_qc[:, 1:], jnp.zeros_like(mask_qc[:, :1])], axis=1)
    last_qc = mask_qc & ~next_mask_qc
    rewards_q = jnp.asarray(rewards_q, jnp.float32)

    def back(carry, xs):
        next_return_q, next_value_q = carry
        value_q, real_q, last_q = xs
        return_q = jnp.where(last_q, rewards_q, (1 - lam) * next_value_q + lam * next_return_q)
        return_q = jnp.where(real_q, return_q, 0.0)
        return (return_q, value_q), return_q

    zeros_q = jnp.zeros_like(rewards_q)
    _, returns_cq = jax.lax.scan(back, (zeros_q, zeros_q), (values_qc.T, mask_qc.T, last_qc.T),
                                 reverse=True)
    return returns_cq.T


def value_loss(values_qc, rewards_q, mask_qc, lam: float = 0.95):
    """`0.5 (V - R^lambda)^2` averaged over real tokens, no gradient through the targets."""
    targets_qc = jax.lax.stop_gradient(td_lambda_targets(values_qc, rewards_q, mask_qc, lam))
    mask_qc = jnp.asarray(mask_qc, jnp.float32)
    squares = jnp.sum(mask_qc * jnp.square(values_qc - targets_qc))
    return 0.5 * squares / jnp.maximum(mask_qc.sum(), 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "steps", "lam"))
def _fit(graphdef, params, hidden_qcd, rewards_q, mask_qc, *, optimizer, steps, lam):
    def loss_fn(p):
        return value_loss(nnx.merge(graphdef, p)(hidden_qcd), rewards_q, mask_qc, lam)

    def step(carry, _):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), loss_i = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params, loss_i


def fit_value_head(head, hidden_qcd, rewards_q, mask_qc, *, steps: int = 300,
                   learning_rate: float = 1e-2, lam: float = 0.95) -> np.ndarray:
    """Trains `head` in place (full-batch Adam) on frozen hidden states; returns loss per step."""
    graphdef, params = nnx.split(head)
    params, loss_i = _fit(graphdef, params, jnp.asarray(hidden_qcd),
                          jnp.asarray(rewards_q, jnp.float32), jnp.asarray(mask_qc, jnp.float32),
                          optimizer=optax.adam(learning_rate), steps=steps, lam=lam)
    nnx.update(head, params)
    return np.asarray(loss_i)


def train_value_head(model, head, candidates: Candidates, rewards_bn, **fit_kwargs) -> np.ndarray:
    """VAS training: hidden states of base-policy samples, then `fit_value_head` on them."""
    hidden_bncd, _ = completion_forward(model, candidates)
    b, n, c, d = hidden_bncd.shape
    return fit_value_head(head, hidden_bncd.reshape(b * n, c, d),
                          np.asarray(rewards_bn).reshape(b * n),
                          np.asarray(candidates.mask_bnc).reshape(b * n, c), **fit_kwargs)

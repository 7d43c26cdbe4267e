"""Implicit token-level rewards, soft values and advantages of a policy against its reference.

The token-level MDP of "From r to Q*: Your Language Model is Secretly a Q-Function" is
deterministic: state ``s_t = (x, y_<t)``, action ``a_t = y_t``, next state
``s_{t+1} = s_t || y_t``; the step after the last real completion token is terminal with
``V = 0``. ``beta`` is the KL temperature ``b``.

Alignment (the same as the per-token log-probs the engine computes):

- ``logps_bt[b, t] = log pi(y_t | s_t)``: index ``t`` is completion token ``y_t``, and every
  per-token output at index ``t`` belongs to the transition ``s_t -> s_{t+1}`` taken by ``y_t``.
  A heatmap colours token string ``t`` by ``rewards_bt[b, t]``.
- ``logits_btv[b, t]`` are the logits of the distribution over ``y_t`` given ``s_t`` (the model's
  output at the row before ``y_t``, already shifted by the caller).
- ``mask_bt`` is 1 for real completion tokens and 0 for prompt and padding; masked outputs are 0.
  Real tokens of a row are contiguous.

Quantities:

- implicit reward ``rhat_t = b (l_t - l^ref_t)``; it equals the true reward shaped by the potential
  V*, ``r(s_t, y_t) + V*(s_{t+1}) - V*(s_t)``, when the policy is optimal for ``r``.
- cumulative return ``G_t = sum_{k<=t} rhat_k`` (return so far, including token t) and return to go
  ``sum_{k>=t} rhat_k``; the sequence total is the DPO implicit reward ``b D(y)``.
- logits are Q-values up to a per-state constant (``b log pi(a|s) = Q(s,a) - V(s)``). This module
  fixes the constant with the reference: ``Q(s,a) = b (z(a) - z_ref(a)) + b log pi_ref(a|s)``,
  i.e. the reward part ``r + V(s')`` is ``b`` times the logit difference and the reference term is
  folded in, so logits equal to the reference logits give ``Q = b log pi_ref`` and ``V = 0``.
  Then ``V(s) = b logsumexp_a Q(s,a)/b = b (logsumexp z - logsumexp z_ref)``, the advantage
  ``A = Q - V = b log pi(a|s)``, and the Bellman reward ``Q(s_t,y_t) - b l^ref_t - V(s_{t+1})``
  differs from ``rhat_t`` only by the shaping ``V(s_t) - V(s_{t+1})``.
  Caveat: Q and V read the per-state logit offset that softmax ignores (logits ``z + c`` give
  ``V + b c``), which preference losses leave unconstrained; they are the true ``Q*``, ``V*`` only
  when the logits are ``Q*/b`` (as in the tabular testbed). The implicit reward, the advantage
  and the KL are offset-free.

Shape suffixes: ``b`` batch rows, ``t`` completion positions, ``v`` vocabulary.
"""

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")


def _f32(x):
    """Casts to at least float32 (float64 stays float64) for logsumexp and log-softmax."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def token_rewards(logps_bt, ref_logps_bt, mask_bt, beta):
    """Per-token implicit rewards ``b (l_t - l^ref_t)``, zero at masked positions."""
    mask_bt = _f32(mask_bt)
    return beta * (_f32(logps_bt) - _f32(ref_logps_bt)) * mask_bt


def sequence_rewards(logps_bt, ref_logps_bt, mask_bt, beta):
    """Sequence implicit rewards ``b D(y)`` (the DPO reward), shape ``[B]``."""
    return token_rewards(logps_bt, ref_logps_bt, mask_bt, beta).sum(axis=-1)


def cumulative_returns(rewards_bt, mask_bt):
    """Return so far ``G_t = sum_{k<=t} r_k`` over real tokens; zero at masked positions."""
    mask_bt = _f32(mask_bt)
    return jnp.cumsum(_f32(rewards_bt) * mask_bt, axis=-1) * mask_bt


def returns_to_go(rewards_bt, mask_bt):
    """Return to go ``sum_{k>=t} r_k`` over real tokens; zero at masked positions."""
    mask_bt = _f32(mask_bt)
    masked_bt = _f32(rewards_bt) * mask_bt
    return jnp.flip(jnp.cumsum(jnp.flip(masked_bt, -1), axis=-1), -1) * mask_bt


def token_kl_estimate(logps_bt, ref_logps_bt, mask_bt, estimator="k1"):
    """Sampled per-token KL(pi || pi_ref) estimate from the taken tokens' log-probs.

    With ``d = l_t - l^ref_t``: ``k1 = d`` (unbiased, can be negative), ``k2 = d^2 / 2``,
    ``k3 = exp(-d) - 1 + d`` (unbiased and non-negative), for tokens sampled from pi.
    """
    d_bt = _f32(logps_bt) - _f32(ref_logps_bt)
    if estimator == "k1":
        kl_bt = d_bt
    elif estimator == "k2":
        kl_bt = 0.5 * jnp.square(d_bt)
    elif estimator == "k3":
        kl_bt = jnp.expm1(-d_bt) + d_bt
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    return kl_bt * _f32(mask_bt)


def token_kl(logits_btv, ref_logits_btv, mask_bt):
    """Exact per-position KL(pi(.|s_t) || pi_ref(.|s_t)) over the full vocabulary."""
    logp_btv = jax.nn.log_softmax(_f32(logits_btv), axis=-1)
    ref_logp_btv = jax.nn.log_softmax(_f32(ref_logits_btv), axis=-1)
    kl_bt = jnp.sum(jnp.exp(logp_btv) * (logp_btv - ref_logp_btv), axis=-1)
    return kl_bt * _f32(mask_bt)


def action_rewards(logits_btv, ref_logits_btv, beta):
    """Implicit reward ``b log pi(a|s_t)/pi_ref(a|s_t)`` of every candidate token, ``[B, T, V]``."""
    logp_btv = jax.nn.log_softmax(_f32(logits_btv), axis=-1)
    ref_logp_btv = jax.nn.log_softmax(_f32(ref_logits_btv), axis=-1)
    return beta * (logp_btv - ref_logp_btv)


def q_values(logits_btv, ref_logits_btv, beta):
    """Soft Q-values of every token with the reference folded in (see the module docstring).

    ``Q(s_t, a) = b (z(a) - z_ref(a)) + b log pi_ref(a|s_t) = b z(a) - b logsumexp z_ref``.
    """
    ref_lse_bt = jax.nn.logsumexp(_f32(ref_logits_btv), axis=-1)
    return beta * (_f32(logits_btv) - ref_lse_bt[..., None])


def soft_values(q_btv, beta, ref_logps_btv=None):
    """Soft values ``V(s_t) = b logsumexp_a Q(s_t, a)/b``.

    Args:
      q_btv: Q-values with the reference folded in; or, when ``ref_logps_btv`` is given, only the
        reward part ``r + V(s')``, and the reference term ``b log pi_ref`` is added here.
      beta: the temperature ``b``.
      ref_logps_btv: optional reference log-probs (normalised) of every token.
    """
    scaled_btv = _f32(q_btv) / beta
    if ref_logps_btv is not None:
        scaled_btv = scaled_btv + _f32(ref_logps_btv)
    return beta * jax.nn.logsumexp(scaled_btv, axis=-1)


def advantages(q_btv, values_bt):
    """Soft advantages ``A(s_t, a) = Q(s_t, a) - V(s_t)`` (equal to ``b log pi(a|s_t)``)."""
    return _f32(q_btv) - _f32(values_bt)[..., None]


def take(x_btv, tokens_bt):
    """Gathers the entry of each position's token, ``[B, T, V] -> [B, T]``."""
    return jnp.take_along_axis(x_btv, tokens_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]


def next_values(values_bt, mask_bt):
    """``V(s_{t+1})`` for each position: the next real position's value, 0 after the last one."""
    masked_bt = _f32(values_bt) * _f32(mask_bt)
    shifted_bt = jnp.concatenate([masked_bt[..., 1:], jnp.zeros_like(masked_bt[..., :1])], -1)
    return shifted_bt * _f32(mask_bt)


def bellman_rewards(q_bt, values_bt, ref_logps_bt, mask_bt, beta):
    """Rewards implied by Q through the Bellman equation: ``Q(s_t,y_t) - b l^ref_t - V(s_{t+1})``.

    With ``q_bt`` the Q-value of the taken token and ``values_bt = V(s_t)``; when the logits are
    ``Q*/b`` (and the reference normalised) this recovers the true per-token reward.
    """
    next_bt = next_values(values_bt, mask_bt)
    r_bt = _f32(q_bt) - beta * _f32(ref_logps_bt) - next_bt
    return r_bt * _f32(mask_bt)

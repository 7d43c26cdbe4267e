"""Online RL objectives on sampled completions (docs/objectives.md): ppo, rto, the GRPO
family (grpo, dr_grpo, dapo, ngrpo, pref_grpo) and rloo.

Completions come in groups of `group_size` consecutive rows (the samples of one prompt).
Token-averaged losses report `metrics["loss"] = (sum of token losses, number of tokens)` and
put each sequence's token SUM in `loss_p`, so `mean_loss` is the global token mean; sequence-
averaged ones count sequences. Batch statistics (advantage whitening, group means) use plain
sums over the full arrays, so they are global under sharding.

Shape letters: `n` completions, `c` completion positions, `g` groups, `k` members of a group.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prefopt_jax.losses.advantages import advantages, multi_objective
from prefopt_jax.losses.base import (Array, LossOutput, RolloutInputs, f32, metric,
                                     ones_like_lead, require, seq_len, seq_reduce)
from prefopt_jax.losses.registry import register

# Log-ratios are clamped before exp so a stale or far-off sample cannot overflow to inf.
_LOG_RATIO_CLAMP = 20.0


def _old_logps(inputs: RolloutInputs) -> Array:
    """Behaviour log-probs, frozen; on-policy (None) means the current ones without gradient."""
    old = inputs.logps_nc if inputs.old_logps_nc is None else inputs.old_logps_nc
    return jax.lax.stop_gradient(f32(old))


def _valid(inputs: RolloutInputs) -> Array:
    return ones_like_lead(inputs.logps_nc, inputs.valid_n)


def _token_mask(inputs: RolloutInputs) -> Array:
    """Completion tokens of real examples only."""
    return f32(inputs.mask_nc) * (_valid(inputs) > 0)[:, None]


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logps_nc: Array, ref_logps_nc: Array, kind: str = "k1") -> Array:
    """Per-token KL estimate with d = log pi - log pi_ref: k1 `d`, k2 `d^2 / 2`,
    k3 `exp(-d) - 1 + d`."""
    d_nc = f32(logps_nc) - f32(ref_logps_nc)
    if kind == "k1":
        return d_nc
    if kind == "k2":
        return 0.5 * jnp.square(d_nc)
    if kind == "k3":
        neg_d = jnp.clip(-d_nc, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return jnp.exp(neg_d) - 1.0 - neg_d
    raise ValueError(f"unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")


def last_token(mask_nc: Array) -> Array:
    """One-hot of each row's last real completion token."""
    mask_nc = f32(mask_nc)
    return mask_nc * (jnp.cumsum(mask_nc, axis=-1) == jnp.sum(mask_nc, -1, keepdims=True))


def gae(rewards_nc: Array, values_nc: Array, mask_nc: Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Array, Array]:
    """GAE: `A_t = delta_t + gamma lam A_{t+1}`, `delta_t = r_t + gamma V_{t+1} - V_t`.

    V after the last real token is 0 (terminal). Returns (advantages, returns = A + V).
    """
    mask_nc = f32(mask_nc)
    values_nc = f32(values_nc) * mask_nc
    next_nc = jnp.concatenate([values_nc[:, 1:], jnp.zeros_like(values_nc[:, :1])], axis=1)
    delta_nc = (f32(rewards_nc) + gamma * next_nc - values_nc) * mask_nc

    def step(carry_n, x):
        delta_n, mask_n = x
        adv_n = (delta_n + gamma * lam * carry_n) * mask_n
        return adv_n, adv_n

    # zeros_like keeps the row sharding, so the carry type matches under Explicit meshes.
    _, adv_cn = jax.lax.scan(step, jnp.zeros_like(delta_nc[:, 0]), (delta_nc.T, mask_nc.T),
                             reverse=True)
    adv_nc = adv_cn.T
    return adv_nc, adv_nc + values_nc


def masked_whiten(x_nc: Array, mask_nc: Array) -> Array:
    """`(x - mean) / sqrt(var + 1e-8)` over the masked entries of the whole batch (unbiased var)."""
    total, count = metric(x_nc, mask_nc)
    mean = total / jnp.maximum(count, 1.0)
    sq, _ = metric(jnp.square(x_nc - mean), mask_nc)
    var = sq / jnp.maximum(count - 1.0, 1.0)
    return (x_nc - mean) * jax.lax.rsqrt(var + 1e-8)


def clipped_surrogate(logps_nc: Array, old_nc: Array, adv_nc: Array, eps_low: float,
                      eps_high: float) -> tuple[Array, Array]:
    """PPO surrogate per token: `-min(rho A, clip(rho, 1 - eps-, 1 + eps+) A)`, and clip mask."""
    log_ratio = jnp.clip(f32(logps_nc) - old_nc, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio_nc = jnp.exp(log_ratio)
    clipped_nc = jnp.clip(ratio_nc, 1.0 - eps_low, 1.0 + eps_high)
    loss_nc = -jnp.minimum(ratio_nc * adv_nc, clipped_nc * adv_nc)
    return loss_nc, (ratio_nc != clipped_nc).astype(jnp.float32)


def rl_output(loss_n: Array, count: Array, inputs: RolloutInputs, extra: dict,
              state: Any = None) -> LossOutput:
    """LossOutput with the loss as (sum, count) over tokens or sequences, filler at 0."""
    valid_n = _valid(inputs)
    loss_n = jnp.where(valid_n > 0, f32(loss_n), 0.0)
    if inputs.weight_n is not None:
        loss_n = loss_n * f32(inputs.weight_n)
    metrics = {"loss": (jnp.sum(loss_n), count),
               "rewards/mean": metric(jnp.where(valid_n > 0, f32(inputs.rewards_n), 0.0),
                                      valid_n), **extra}
    if inputs.entropy_nc is not None:
        metrics["entropy"] = metric(jax.lax.stop_gradient(f32(inputs.entropy_nc)),
                                    _token_mask(inputs))
    return LossOutput(loss_p=loss_n, metrics=metrics, state=state)


def shaped_rewards(inputs: RolloutInputs, beta: float, kl_estimator: str) -> Array:
    """`r - b sum_t KLhat_t(pi_old || pi_ref)`: the KL penalty in the reward (none without a
    reference or with b = 0)."""
    rewards_n = f32(inputs.rewards_n)
    if inputs.ref_logps_nc is None or beta == 0.0:
        return rewards_n
    kl_nc = kl_estimate(_old_logps(inputs), jax.lax.stop_gradient(f32(inputs.ref_logps_nc)),
                        kl_estimator)
    return rewards_n - beta * seq_reduce(kl_nc, _token_mask(inputs))


def _approx_kl(inputs: RolloutInputs, tok_nc: Array):
    """Metric: the token mean of `(log pi - log pi_old)^2 / 2`, how far the update has moved
    the policy from the sampler's (the online loop's early stop reads it)."""
    log_ratio_nc = jax.lax.stop_gradient(f32(inputs.logps_nc) - _old_logps(inputs))
    return metric(0.5 * jnp.square(log_ratio_nc), tok_nc)


def _entropy_bonus(inputs: RolloutInputs, coef: float) -> Array:
    """`-c H_t` per token (0 without a coefficient or without entropies)."""
    if not coef:
        return jnp.zeros_like(f32(inputs.mask_nc))
    entropy_nc = require({"entropy_nc": inputs.entropy_nc}, "entropy_nc", "entropy bonus")
    return -coef * f32(entropy_nc)


def _sequence_rewards(inputs: RolloutInputs, reward_clip: float, whiten_rewards: bool) -> Array:
    """The sparse rewards PPO adds at the last token: clipped to `+-reward_clip` (0: off), then
    with `whiten_rewards` divided by their standard deviation over the batch's real samples
    (not shifted: a shift would move every reward against the KL penalty)."""
    rewards_n, valid_n = f32(inputs.rewards_n), _valid(inputs)
    if reward_clip:
        rewards_n = jnp.clip(rewards_n, -reward_clip, reward_clip)
    if whiten_rewards:
        total, count = metric(rewards_n, valid_n)
        mean = total / jnp.maximum(count, 1.0)
        var = metric(jnp.square(rewards_n - mean), valid_n)[0] / jnp.maximum(count - 1.0, 1.0)
        rewards_n = rewards_n * jax.lax.rsqrt(var + 1e-8)
    return rewards_n


def _ppo_loss(inputs: RolloutInputs, token_rewards_nc: Array, *, gamma: float, lam: float,
              cliprange: float, cliprange_value: float, vf_coef: float, whiten: bool,
              loss: str) -> LossOutput:
    """Clipped policy loss + clipped value loss on GAE advantages of the given token rewards."""
    tok_nc = _token_mask(inputs)
    values_nc = f32(require({"values_nc": inputs.values_nc}, "values_nc", loss))
    old_values_nc = jax.lax.stop_gradient(
        values_nc if inputs.old_values_nc is None else f32(inputs.old_values_nc))
    adv_nc, ret_nc = gae(jax.lax.stop_gradient(token_rewards_nc), old_values_nc, tok_nc,
                         gamma, lam)
    adv_nc = masked_whiten(adv_nc, tok_nc) if whiten else adv_nc
    pg_nc, clip_nc = clipped_surrogate(inputs.logps_nc, _old_logps(inputs),
                                       jax.lax.stop_gradient(adv_nc), cliprange, cliprange)
    v_clip_nc = old_values_nc + jnp.clip(values_nc - old_values_nc, -cliprange_value,
                                         cliprange_value)
    vf_nc = 0.5 * jnp.maximum(jnp.square(values_nc - ret_nc), jnp.square(v_clip_nc - ret_nc))
    loss_n = jnp.sum(jnp.where(tok_nc > 0, pg_nc + vf_coef * vf_nc, 0.0), axis=-1)
    kl_n = jnp.zeros_like(f32(inputs.rewards_n)) if inputs.ref_logps_nc is None else \
        seq_reduce(_old_logps(inputs) - jax.lax.stop_gradient(f32(inputs.ref_logps_nc)), tok_nc)
    extra = {"approx_kl": _approx_kl(inputs, tok_nc),
             "kl/sequence": metric(kl_n, _valid(inputs)),
             "ppo/policy_loss": metric(jax.lax.stop_gradient(pg_nc), tok_nc),
             "ppo/value_loss": metric(jax.lax.stop_gradient(vf_nc), tok_nc),
             "ppo/clip_frac": metric(clip_nc, tok_nc),
             "ppo/values": metric(jax.lax.stop_gradient(values_nc), tok_nc),
             "ppo/returns": metric(ret_nc, tok_nc),
             "ppo/token_reward": metric(jax.lax.stop_gradient(token_rewards_nc), tok_nc)}
    return rl_output(loss_n, jnp.sum(tok_nc), inputs, extra)


@register("ppo", inputs="rollout", reference=True, reference_off="kl_coef",
          coupling="batch", needs=("rollouts", "critic"),
          paper=("Proximal Policy Optimization Algorithms; Training language models to follow "
                 "instructions with human feedback"))
def ppo(inputs: RolloutInputs, state: Any = None, *, kl_coef: float = 0.05,
        kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95, cliprange: float = 0.2,
        cliprange_value: float = 0.2, vf_coef: float = 0.1, whiten: bool = True,
        reward_clip: float = 0.0, whiten_rewards: bool = False) -> LossOutput:
    """PPO (RLHF): token reward `-b_kl KLhat_t + 1[t=T] r`, GAE, whitened A, clipped losses.

    KLhat uses the behaviour policy vs the reference (k1 or k3; none without a reference).
    Per token: `-min(rho A, clip(rho, 1 +- 0.2) A) + vf 0.5 max((V-R)^2, (clip(V) - R)^2)`,
    averaged over all tokens of the batch. Needs values_nc (and old_values_nc off-policy).
    `reward_clip` clips r to `+-reward_clip` (0: off); `whiten_rewards` divides r by its batch
    standard deviation.
    """
    old_nc = _old_logps(inputs)
    kl_nc = (jnp.zeros_like(old_nc) if inputs.ref_logps_nc is None
             else kl_estimate(old_nc, inputs.ref_logps_nc, kl_estimator))
    rewards_n = _sequence_rewards(inputs, reward_clip, whiten_rewards)
    token_rewards_nc = -kl_coef * kl_nc + last_token(inputs.mask_nc) * rewards_n[:, None]
    return _ppo_loss(inputs, token_rewards_nc, gamma=gamma, lam=lam, cliprange=cliprange,
                     cliprange_value=cliprange_value, vf_coef=vf_coef, whiten=whiten,
                     loss="ppo")


@register("rto", inputs="rollout", reference=True, coupling="batch",
          needs=("rollouts", "token_rewards", "critic"),
          paper="DPO Meets PPO: Reinforced Token Optimization for RLHF")
def rto(inputs: RolloutInputs, state: Any = None, *, beta1: float = 0.05, clip: float = 0.05,
        beta2: float = 0.01, beta3: float = 1.0, gamma: float = 1.0, lam: float = 0.95,
        cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
        whiten: bool = True, reward_clip: float = 0.0, whiten_rewards: bool = False
        ) -> LossOutput:
    """RTO: PPO on `r_t = clip(b1 D_t, +-c) - b2 log pi_old/pi_ref + 1[t=T] b3 r`.

    `D_t = log pi_dpo(y_t|s_t) - log pi_dpo_ref(y_t|s_t)`: a DPO policy's log-ratio of the
    sampled token against its own reference, in `extras["dpo_log_ratio_nc"]` (the engine's
    `token_rewards` need, `AlgoConfig.teacher`); needs the reference. `reward_clip` and
    `whiten_rewards` treat the sparse `r` as in ppo.
    """
    ref_nc = f32(require({"ref_logps_nc": inputs.ref_logps_nc}, "ref_logps_nc", "rto"))
    dpo_nc = f32(require(inputs.extras, "dpo_log_ratio_nc", "rto"))
    token_rewards_nc = (jnp.clip(beta1 * dpo_nc, -clip, clip)
                        - beta2 * (_old_logps(inputs) - ref_nc)
                        + last_token(inputs.mask_nc) * beta3
                        * _sequence_rewards(inputs, reward_clip, whiten_rewards)[:, None])
    return _ppo_loss(inputs, token_rewards_nc, gamma=gamma, lam=lam, cliprange=cliprange,
                     cliprange_value=cliprange_value, vf_coef=vf_coef, whiten=whiten,
                     loss="rto")


def _group_policy_loss(inputs: RolloutInputs, adv_n: Array, *, beta: float, eps_low: float,
                       eps_high: float, reduction: str, kl_estimator: str = "k3",
                       entropy_coef: float = 0.0) -> LossOutput:
    """`-[min(rho A, clip(rho) A) - b KLhat(pi || pi_ref) + c H]` per token, reduced per
    `reduction`.

    "sequence": (1/|o_i|) sum_t, mean over sequences (GRPO); "max_length": sum_t / C, mean over
    sequences (Dr. GRPO); "token": sum over all tokens / number of tokens (DAPO). `beta` 0 (or
    no reference) drops the KL term, as when the KL is in the reward instead.
    """
    tok_nc = _token_mask(inputs)
    adv_n = jax.lax.stop_gradient(adv_n)
    pg_nc, clip_nc = clipped_surrogate(inputs.logps_nc, _old_logps(inputs), adv_n[:, None],
                                       eps_low, eps_high)
    kl_nc = jnp.zeros_like(pg_nc)
    if inputs.ref_logps_nc is not None and beta != 0.0:
        kl_nc = kl_estimate(inputs.logps_nc, jax.lax.stop_gradient(f32(inputs.ref_logps_nc)),
                            kl_estimator)
    token_loss_nc = pg_nc + beta * kl_nc + _entropy_bonus(inputs, entropy_coef)
    valid_n = _valid(inputs)
    if reduction == "token":
        loss_n, count = seq_reduce(token_loss_nc, tok_nc), jnp.sum(tok_nc)
    else:
        norm_n = seq_len(tok_nc) if reduction == "sequence" else jnp.float32(tok_nc.shape[1])
        loss_n, count = seq_reduce(token_loss_nc, tok_nc) / norm_n, jnp.sum(valid_n)
    extra = {"advantages/mean": metric(adv_n, valid_n),
             "kl": metric(jax.lax.stop_gradient(kl_nc), tok_nc),
             "clip_frac": metric(clip_nc, tok_nc), "approx_kl": _approx_kl(inputs, tok_nc)}
    return rl_output(loss_n, count, inputs, extra)


def _estimate(inputs: RolloutInputs, name: str, rewards_n: Array, group_size: int,
              **params) -> Array:
    """Advantages of estimator `name` from `rewards_n`; with reward columns in `extras`
    (`reward_columns_nm` and `reward_weights_m`: the online loop's per-reward advantages,
    multi-objective GRPO) each column's own estimate, weighted and summed; a KL shaping of the
    reward (`rewards_n` minus the batch's rewards) joins as one more column of weight 1."""
    columns_nm = inputs.extras.get("reward_columns_nm")
    if columns_nm is None:
        return advantages(name, rewards_n, _valid(inputs), group_size, **params)
    columns_nm, weights_m = f32(columns_nm), f32(inputs.extras["reward_weights_m"])
    shaping_n = f32(rewards_n) - f32(inputs.rewards_n)  # exactly 0 without a shaping
    columns_nm = jnp.concatenate([columns_nm, shaping_n[:, None]], axis=1)
    weights_m = jnp.concatenate([weights_m, jnp.ones((1,), jnp.float32)])
    return multi_objective(name, columns_nm, _valid(inputs), group_size, weights_m, **params)


def _kl_split(inputs: RolloutInputs, beta: float, kl_estimator: str, kl_in: str):
    """(rewards for the advantages, the loss's KL coefficient): KL in the loss or the reward."""
    if kl_in == "loss":
        return inputs.rewards_n, beta
    if kl_in == "reward":
        return shaped_rewards(inputs, beta, kl_estimator), 0.0
    raise ValueError(f"kl_in must be 'loss' or 'reward', not {kl_in!r}")


@register("grpo", inputs="rollout", reference=True, reference_off="beta",
          coupling="batch", needs=("rollouts",),
          paper=("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language "
                 "Models (GRPO)"))
def grpo(inputs: RolloutInputs, state: Any = None, *, group_size: int, beta: float = 0.04,
         epsilon: float = 0.2, std_eps: float = 1e-4, kl_estimator: str = "k3",
         kl_in: str = "loss", entropy_coef: float = 0.0, estimator: str = "grpo") -> LossOutput:
    """GRPO: `A = (r - mean_G r)/(std_G r + eps)`; `-(1/|o|) sum_t [min(rho A, clip A) - b KL]`.

    KL is k3 of the current policy against the reference (`kl_estimator` k1/k2/k3); std is the
    unbiased group std. `kl_in='reward'` puts `b sum_t KLhat(pi_old || pi_ref)` in the reward
    instead. `estimator` names another advantage estimator (`losses.advantages`, e.g.
    `reinforce_pp`); `entropy_coef` adds an entropy bonus.
    """
    rewards_n, beta = _kl_split(inputs, beta, kl_estimator, kl_in)
    adv_n = _estimate(inputs, estimator, rewards_n, group_size,
                      **({"std_eps": std_eps} if estimator in ("grpo", "ngrpo") else {}))
    return _group_policy_loss(inputs, adv_n, beta=beta, eps_low=epsilon, eps_high=epsilon,
                              reduction="sequence", kl_estimator=kl_estimator,
                              entropy_coef=entropy_coef)


@register("dr_grpo", inputs="rollout", reference=True, reference_off="beta",
          coupling="batch", needs=("rollouts",),
          paper="Understanding R1-Zero-Like Training: A Critical Perspective (Dr. GRPO)")
def dr_grpo(inputs: RolloutInputs, state: Any = None, *, group_size: int, beta: float = 0.04,
            epsilon: float = 0.2, kl_estimator: str = "k3", kl_in: str = "loss",
            entropy_coef: float = 0.0) -> LossOutput:
    """Dr. GRPO: `A_i = r_i - mean_G r` (no std); token sums over the fixed length C (no |o_i|)."""
    rewards_n, beta = _kl_split(inputs, beta, kl_estimator, kl_in)
    adv_n = _estimate(inputs, "dr_grpo", rewards_n, group_size)
    return _group_policy_loss(inputs, adv_n, beta=beta, eps_low=epsilon, eps_high=epsilon,
                              reduction="max_length", kl_estimator=kl_estimator,
                              entropy_coef=entropy_coef)


@register("dapo", inputs="rollout", reference=False, coupling="batch", needs=("rollouts",),
          paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale")
def dapo(inputs: RolloutInputs, state: Any = None, *, group_size: int, epsilon: float = 0.2,
         epsilon_high: float | None = None, std_eps: float = 1e-4,
         entropy_coef: float = 0.0) -> LossOutput:
    """DAPO: GRPO advantages, token-sum / token-count over the batch, no KL (b = 0).

    `epsilon_high` (clip-higher) defaults to epsilon; DAPO's paper uses 0.28. Dynamic sampling,
    overlong filtering and the soft overlong penalty are the online loop's (`RLConfig`).
    """
    adv_n = _estimate(inputs, "grpo", inputs.rewards_n, group_size, std_eps=std_eps)
    high = epsilon if epsilon_high is None else epsilon_high
    return _group_policy_loss(inputs, adv_n, beta=0.0, eps_low=epsilon, eps_high=high,
                              reduction="token", entropy_coef=entropy_coef)


@register("ngrpo", inputs="rollout", reference=True, reference_off="beta",
          coupling="batch", needs=("rollouts",),
          paper="NGRPO: Negative-enhanced Group Relative Policy Optimization")
def ngrpo(inputs: RolloutInputs, state: Any = None, *, group_size: int, max_reward: float = 1.0,
          beta: float = 0.04, eps_high: float = 0.24, eps_low: float = 0.16,
          std_eps: float = 1e-4, kl_estimator: str = "k3", kl_in: str = "loss",
          entropy_coef: float = 0.0) -> LossOutput:
    """NGRPO: GRPO whose group mean/std include a virtual sample with the max reward; clip
    `[1 - 0.16, 1 + 0.24]`. [summary] spec: the virtual sample only enters the statistics."""
    rewards_n, beta = _kl_split(inputs, beta, kl_estimator, kl_in)
    adv_n = _estimate(inputs, "ngrpo", rewards_n, group_size, max_reward=max_reward,
                      std_eps=std_eps)
    return _group_policy_loss(inputs, adv_n, beta=beta, eps_low=eps_low, eps_high=eps_high,
                              reduction="sequence", kl_estimator=kl_estimator,
                              entropy_coef=entropy_coef)


@register("pref_grpo", inputs="rollout", reference=True, reference_off="beta",
          coupling="batch", needs=("rollouts", "group_preferences"),
          paper="Pref-GRPO: Pairwise Preference Reward-based GRPO")
def pref_grpo(inputs: RolloutInputs, state: Any = None, *, group_size: int, beta: float = 0.04,
              epsilon: float = 0.2, std_eps: float = 1e-4, kl_estimator: str = "k3",
              kl_in: str = "loss", entropy_coef: float = 0.0) -> LossOutput:
    """Pref-GRPO: reward_i = mean_{j != i} P(y_i beats y_j) within the group, then GRPO.

    `extras["win_prob_gkk"]` [G, K, K]: preference-model win probabilities; `rewards_n` is
    replaced by the win rates (reported as rewards/mean).
    """
    p_gkk = f32(require(inputs.extras, "win_prob_gkk", "pref_grpo"))
    g, k = p_gkk.shape[:2]
    v_gk = (_valid(inputs) > 0).reshape(g, k).astype(jnp.float32)
    others_gkk = v_gk[:, None, :] * (1.0 - jnp.eye(k))[None]
    wins_gk = jnp.sum(p_gkk * others_gkk, -1) / jnp.maximum(jnp.sum(others_gkk, -1), 1.0)
    # The win rates are the reward: per-function reward columns do not apply.
    extras = {k: v for k, v in inputs.extras.items() if k != "reward_columns_nm"}
    inputs = inputs.replace(rewards_n=jax.lax.stop_gradient(wins_gk.reshape(-1)), extras=extras)
    return grpo(inputs, group_size=group_size, beta=beta, epsilon=epsilon, std_eps=std_eps,
                kl_estimator=kl_estimator, kl_in=kl_in, entropy_coef=entropy_coef)


@register("rloo", inputs="rollout", reference=True, reference_off="beta",
          coupling="batch", needs=("rollouts",),
          paper=("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human"
                 " Feedback in LLMs (RLOO)"))
def rloo(inputs: RolloutInputs, state: Any = None, *, group_size: int,
         beta: float = 0.05, entropy_coef: float = 0.0) -> LossOutput:
    """RLOO: `r' = r - b sum_t (log pi_old - log pi_ref)`, `A_i = r'_i - mean_{j != i} r'_j`;
    REINFORCE loss `-A_i L(y_i)` (sequence log-prob sum), mean over sequences."""
    tok_nc = _token_mask(inputs)
    kl_n = (jnp.zeros(tok_nc.shape[:1], jnp.float32) if inputs.ref_logps_nc is None
            else seq_reduce(_old_logps(inputs) - f32(inputs.ref_logps_nc), tok_nc))
    shaped_n = f32(inputs.rewards_n) - beta * kl_n
    valid_n = _valid(inputs)
    adv_n = jax.lax.stop_gradient(_estimate(inputs, "rloo", shaped_n, group_size))
    loss_n = (-adv_n * seq_reduce(inputs.logps_nc, tok_nc)
              + seq_reduce(_entropy_bonus(inputs, entropy_coef), tok_nc))
    extra = {"advantages/mean": metric(adv_n, valid_n), "kl": metric(kl_n, valid_n)}
    return rl_output(loss_n, jnp.sum(valid_n > 0).astype(jnp.float32), inputs, extra)

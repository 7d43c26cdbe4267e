"""PPO's parts against a numpy transcription and hand-computed values: GAE over ragged
completion masks, the clipped value loss and the KL penalty in the token rewards."""

import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import losses
from prefopt_jax.losses.base import RolloutInputs
from prefopt_jax.losses.rl import gae


def gae_numpy(rewards, values, mask, gamma, lam):
    """Per row, backwards over its real tokens: `delta_t = r_t + gamma V_{t+1} - V_t` (V after
    the last real token is 0), `A_t = delta_t + gamma lam A_{t+1}`; returns `A + V`."""
    adv = np.zeros_like(rewards)
    for i in range(len(rewards)):
        real = [t for t in range(rewards.shape[1]) if mask[i, t] > 0]
        following = 0.0
        for j in reversed(range(len(real))):
            t = real[j]
            next_value = values[i, real[j + 1]] if j + 1 < len(real) else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            following = delta + gamma * lam * following
            adv[i, t] = following
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_a_numpy_transcription_on_ragged_masks(gamma, lam):
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
                    np.float32)
    rewards = rng.normal(size=mask.shape).astype(np.float32) * mask
    values = rng.normal(size=mask.shape).astype(np.float32)
    got_adv, got_ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma,
                           lam)
    want_adv, want_ret = gae_numpy(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-6)
    if lam == 0.0:  # one-step TD: A_t = delta_t
        t = 0
        np.testing.assert_allclose(got_adv[0, t], rewards[0, t] + gamma * values[0, t + 1]
                                   - values[0, t], rtol=1e-5)
    if lam == 1.0 and gamma == 1.0:  # Monte Carlo: A_t = sum_{u >= t} r_u - V_t
        np.testing.assert_allclose(got_adv[1, :3], np.cumsum(rewards[1, :3][::-1])[::-1]
                                   - values[1, :3], rtol=1e-5)


def one_token(value, old_value, reward, **hyper):
    """PPO on one sequence of one token at ratio 1, no reference, no whitening."""
    inputs = RolloutInputs(logps_nc=jnp.array([[-1.0]]), mask_nc=jnp.ones((1, 1)),
                           rewards_n=jnp.array([reward]), old_logps_nc=jnp.array([[-1.0]]),
                           values_nc=jnp.array([[value]]), old_values_nc=jnp.array([[old_value]]))
    return losses.get("ppo")(inputs, whiten=False, **hyper)


def test_value_loss_is_clipped_around_the_old_value():
    # return R = A + V_old = reward = 0; V = 0.5 moved 0.5 from V_old = 1, clipped to 0.8:
    # 0.5 max((0.5 - 0)^2, (0.8 - 0)^2) = 0.32; the policy term at ratio 1 is -A = 1.
    out = one_token(0.5, 1.0, 0.0, vf_coef=0.1, cliprange_value=0.2)
    value_loss, count = out.metrics["ppo/value_loss"]
    np.testing.assert_allclose(value_loss / count, 0.32, rtol=1e-6)
    np.testing.assert_allclose(losses.mean_loss(out), 1.0 + 0.1 * 0.32, rtol=1e-6)
    # Inside the clip range the plain squared error: 0.5 (1.1 - 0)^2.
    out = one_token(1.1, 1.0, 0.0, vf_coef=1.0, cliprange_value=0.2)
    np.testing.assert_allclose(out.metrics["ppo/value_loss"][0], 0.5 * 1.1 ** 2, rtol=1e-6)
    # Moving towards the return is not clipped away: V = 0.5, V_old = 1, R = 0.7.
    out = one_token(0.5, 1.0, 0.7, vf_coef=1.0, cliprange_value=0.2)
    np.testing.assert_allclose(out.metrics["ppo/value_loss"][0],
                               0.5 * max((0.5 - 0.7) ** 2, (0.8 - 0.7) ** 2), rtol=1e-5)


@pytest.mark.parametrize("estimator,kl", [
    ("k1", [0.5, -1.0]),  # d = log pi_old - log pi_ref
    ("k3", [np.exp(-0.5) - 1 + 0.5, np.exp(1.0) - 1 - 1.0]),  # exp(-d) - 1 + d
])
def test_kl_penalty_enters_every_token_reward(estimator, kl):
    # r_t = -0.1 KLhat_t + 1[t = T] R, with R = 1; V = 0, gamma = lam = 1: A_t = sum_{u>=t} r_u.
    old = jnp.array([[-1.0, -2.0]])
    inputs = RolloutInputs(logps_nc=old, mask_nc=jnp.ones((1, 2)), rewards_n=jnp.array([1.0]),
                           old_logps_nc=old, ref_logps_nc=jnp.array([[-1.5, -1.0]]),
                           values_nc=jnp.zeros((1, 2)), old_values_nc=jnp.zeros((1, 2)))
    out = losses.get("ppo")(inputs, kl_coef=0.1, kl_estimator=estimator, lam=1.0, whiten=False)
    rewards = np.array([-0.1 * kl[0], -0.1 * kl[1] + 1.0])
    returns = np.cumsum(rewards[::-1])[::-1]
    total, count = out.metrics["ppo/token_reward"]
    np.testing.assert_allclose(total / count, rewards.mean(), rtol=1e-5)
    total, count = out.metrics["ppo/returns"]
    np.testing.assert_allclose(total / count, returns.mean(), rtol=1e-5)
    # The policy term at ratio 1 is -A per token, averaged over the tokens.
    np.testing.assert_allclose(out.metrics["ppo/policy_loss"][0] / 2, -returns.mean(),
                               rtol=1e-5)


@pytest.mark.parametrize("hyper,want", [
    ({"reward_clip": 0.5}, [0.5, -0.5, 0.25]),  # clipped to +-0.5
    ({"whiten_rewards": True}, np.array([2.0, -3.0, 0.25]) / np.std([2.0, -3.0, 0.25], ddof=1)),
])
def test_sparse_rewards_are_clipped_or_scaled_before_the_last_token(hyper, want):
    # No reference (no KL), one token each: the token reward is the processed sequence reward.
    inputs = RolloutInputs(logps_nc=jnp.zeros((3, 1)), mask_nc=jnp.ones((3, 1)),
                           rewards_n=jnp.array([2.0, -3.0, 0.25]),
                           values_nc=jnp.zeros((3, 1)), old_values_nc=jnp.zeros((3, 1)))
    for name in ("ppo", "rto"):
        extra = {} if name == "ppo" else {"beta1": 0.0, "beta2": 0.0}
        if name == "rto":
            inputs = inputs.replace(ref_logps_nc=jnp.zeros((3, 1)),
                                    extras={"dpo_log_ratio_nc": jnp.zeros((3, 1))})
        out = losses.get(name)(inputs, whiten=False, **hyper, **extra)
        total, count = out.metrics["ppo/token_reward"]
        np.testing.assert_allclose(total / count, np.mean(want), rtol=1e-5)
        # A = r (V = 0): the policy term at ratio 1 is -r per token.
        np.testing.assert_allclose(out.metrics["ppo/policy_loss"][0], -np.sum(want), rtol=1e-5)

"""Gradients stay finite with bfloat16 inputs at large margins (|h| ~ 1e3), both signs.

(Zero gradient on filler examples is checked in test_losses_reference.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefopt_jax.losses as losses
from losses_cases import GROUPED, LogitsDistill, family, loss_fn, text_names

BF16 = jnp.bfloat16


def big_pair(sign, p=3, c=4):
    """Chosen ~0 per token, rejected -300 per token, reference the other way round:
    D_w ~ +1200, D_l ~ -1200 (times sign)."""
    near0 = jnp.full((p, c), -1e-3, BF16)
    far = jnp.full((p, c), -300.0, BF16)
    w, l = (near0, far) if sign > 0 else (far, near0)
    ones = jnp.ones((p, c), BF16)
    return losses.PairwiseInputs(
        logps_w_pc=w, logps_l_pc=l, mask_w_pc=ones, mask_l_pc=ones.at[:, -1].set(0),
        ref_logps_w_pc=l, ref_logps_l_pc=w, valid_p=jnp.asarray([1, 1, 0], BF16),
        token_rewards_w_pc=ones * 3, token_rewards_l_pc=-ones * 3,
        logits_w_pcv=jnp.stack([ones * 1e3, -ones * 1e3], -1),
        logits_l_pcv=jnp.stack([-ones * 1e3, ones * 1e3], -1),
        extras={"gold_logps_pc": w, "gold_mask_pc": ones,
                "other_rewards_w_pk": jnp.full((p, 1), 1e3 * sign, BF16),
                "other_rewards_l_pk": jnp.full((p, 1), -1e3 * sign, BF16),
                "win_prob_w_p": jnp.full((p,), 0.9, BF16),
                "win_prob_l_p": jnp.full((p,), 0.1, BF16)})


def big_unpaired(sign, n=4, c=4):
    near0 = jnp.full((n, c), -1e-3, BF16)
    far = jnp.full((n, c), -300.0, BF16)
    label = jnp.asarray([True, False, True, False])
    pol = jnp.where(label[:, None] == (sign > 0), near0, far)
    ref = jnp.where(label[:, None] == (sign > 0), far, near0)
    ones = jnp.ones((n, c), BF16)
    return losses.UnpairedInputs(logps_nc=pol, mask_nc=ones, label_n=label, ref_logps_nc=ref,
                                 valid_n=jnp.asarray([1, 1, 1, 0], BF16), kl_logps_nc=pol,
                                 kl_ref_logps_nc=ref, kl_mask_nc=ones)


def big_list(sign, p=2, k=3, c=2):
    scale = jnp.asarray([0.0, -300.0, -600.0], BF16)[None, :, None] * sign
    pol = jnp.broadcast_to(jnp.minimum(scale, -1e-3), (p, k, c)).astype(BF16)
    ref = jnp.broadcast_to(jnp.minimum(-scale - 600 * (sign < 0), -1e-3), (p, k, c)).astype(BF16)
    return losses.ListwiseInputs(logps_pkc=pol, mask_pkc=jnp.ones((p, k, c), BF16),
                                 scores_pk=jnp.asarray([[3, 2, 1], [1, 2, 3]], BF16),
                                 ref_logps_pkc=ref, valid_p=jnp.asarray([1, 0], BF16))


def big_rewards(sign):
    return losses.RewardPairInputs(reward_w_p=jnp.asarray([1e3, -1e3], BF16) * sign,
                                   reward_l_p=jnp.asarray([-1e3, 1e3], BF16) * sign,
                                   margin_p=jnp.asarray([0.5, 0.5], BF16))


def big_distill(sign, n=2, c=3, v=5):
    z = jnp.linspace(-1e3, 1e3, n * c * v).reshape(n, c, v).astype(BF16)
    return LogitsDistill(logits_ncv=z * sign, dpo_logits_ncv=-z, ref_logits_ncv=z,
                         mask_nc=jnp.ones((n, c), BF16))


def big_rollout(sign, n=4, c=4):
    """Rewards and values ~1e3, the policy ~1200 nats from the reference, off-policy by 5 nats."""
    pol = jnp.tile(jnp.asarray([[-1e-3], [-300.0]], BF16), (n // 2, c))
    far = jnp.where(pol > -1, -300.0, -1e-3).astype(BF16)
    return losses.RolloutInputs(
        logps_nc=pol, mask_nc=jnp.ones((n, c), BF16),
        rewards_n=jnp.asarray([1e3, -1e3] * (n // 2), BF16) * sign,
        old_logps_nc=(pol - 5.0 * sign).astype(BF16), ref_logps_nc=far,
        values_nc=jnp.full((n, c), 1e3, BF16) * sign, old_values_nc=jnp.full((n, c), -1e3, BF16),
        extras={"dpo_log_ratio_nc": far, "win_prob_gkk": jnp.full((n // 2, 2, 2), 0.5, BF16)})


BIG = {"pairwise": big_pair, "unpaired": big_unpaired, "listwise": big_list,
       "reward": big_rewards, "distill": big_distill, "rollout": big_rollout}
# The differentiable (policy) field of each input family.
POLICY = {"pairwise": ("logps_w_pc", "logps_l_pc"), "unpaired": ("logps_nc",),
          "listwise": ("logps_pkc",), "reward": ("reward_w_p", "reward_l_p"),
          "distill": ("logits_ncv",), "rollout": ("logps_nc", "values_nc")}


def _grads(fn, inputs, fields, **hyper):
    def loss(params):
        return losses.mean_loss(fn(inputs.replace(**params), **hyper))

    params = {f: getattr(inputs, f) for f in fields}
    return jax.jit(jax.value_and_grad(loss))(params)


LOSSES = text_names()


def both_signs(fam):
    """One batch holding the +margin examples then the -margin ones (one compile per loss)."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), BIG[fam](1), BIG[fam](-1))


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_large_margin_grads_finite(name):
    fam = family(name)
    hyper = {"group_size": 2} if name in GROUPED else {}
    value, grads = _grads(loss_fn(name), both_signs(fam), POLICY[fam], **hyper)
    assert np.isfinite(np.float32(value)), value
    for field, g in grads.items():
        assert g.dtype == BF16
        assert np.all(np.isfinite(np.asarray(g, np.float32))), (field, g)

"""Modifiers: mixing is a weighted sum; f-divergence reverse KL is the plain loss and the other
divergences match psi transcribed in numpy; LD-DPO alpha=1 is the plain loss; WPO weights carry
no gradient; reference-free zeroes the reference; they compose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prefopt_jax.losses as losses
from losses_cases import pair_case, pair_inputs
from losses_np_ref import REFERENCES, finish, logsig, sums
from prefopt_jax.losses import modifiers

CASE = pair_case(seed=21)
INPUTS = pair_inputs(CASE)


def close(a, b, **kw):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=kw.get("rtol", 2e-5),
                               atol=kw.get("atol", 2e-6))


def test_mix_is_weighted_sum():
    mixed = losses.mix([("dpo", 0.3), ("ipo", 0.5, {"beta": 0.2}), (losses.get("sft"), 1.0)])
    out = mixed(INPUTS)
    parts = [losses.get("dpo")(INPUTS), losses.get("ipo")(INPUTS, beta=0.2),
             losses.get("sft")(INPUTS)]
    close(out.loss_p, 0.3 * parts[0].loss_p + 0.5 * parts[1].loss_p + parts[2].loss_p)
    close(losses.mean_loss(out), 0.3 * losses.mean_loss(parts[0])
          + 0.5 * losses.mean_loss(parts[1]) + losses.mean_loss(parts[2]))
    close(out.metrics["ipo/rewards/margin"][0], parts[1].metrics["rewards/margin"][0])
    assert out.state == (None, None, None)


def test_mix_same_loss_twice_keeps_metrics_apart():
    out = losses.mix([("dpo", 1.0), ("dpo", 1.0, {"beta": 0.5})])(INPUTS)
    assert "0.dpo/loss" in out.metrics and "1.dpo/loss" in out.metrics


def test_mpo_carries_bco_state():
    out = losses.get("mpo")(INPUTS)
    assert out.state[0] is None and out.state[2] is None
    _, want_state = REFERENCES["bco_pair"](CASE)
    close(out.state[1]["mean"], want_state["mean"])
    out2 = losses.get("mpo")(INPUTS, out.state)
    close(out2.state[1]["count"], 2 * want_state["count"])


@pytest.mark.parametrize("name", modifiers.F_DIVERGENCE_LOSSES)
def test_f_divergence_reverse_kl_is_plain(name):
    close(losses.f_divergence(name, "reverse_kl")(INPUTS).loss_p, losses.get(name)(INPUTS).loss_p)


PSI_NP = {
    "forward_kl": lambda d, a: 1 - np.exp(-d),
    "js": lambda d, a: np.log(2) + logsig(d),
    "alpha": lambda d, a: (1 - np.exp(-a * d)) / a,
}


@pytest.mark.parametrize("divergence", sorted(PSI_NP))
def test_f_divergence_matches_numpy(divergence):
    lw, ll, rw, rl, nw, nl = sums(CASE)
    psi = lambda d: PSI_NP[divergence](d, 0.3)  # noqa: E731
    h = psi(lw - rw) - psi(ll - rl)
    want_dpo = finish(-logsig(0.1 * h), CASE)
    got = losses.f_divergence("dpo", divergence, alpha=0.3)(INPUTS)
    close(got.loss_p, want_dpo)
    close(got.metrics["rewards/chosen"][0], (0.1 * psi(lw - rw) * CASE["valid"]).sum())
    hbar = psi((lw - rw) / nw) - psi((ll - rl) / nl)  # ipo: psi of the length-mean log-ratios
    want_ipo = finish((hbar - 1 / (2 * 0.1)) ** 2, CASE)
    close(losses.f_divergence("ipo", divergence, alpha=0.3)(INPUTS).loss_p, want_ipo, rtol=1e-4)


def test_f_divergence_rejects_other_losses():
    for name in ("simpo", "kto", "aot", "cpo"):
        with pytest.raises(ValueError, match="only to losses of the margin"):
            losses.f_divergence(name, "js")
    with pytest.raises(ValueError, match="unknown divergence"):
        losses.f_divergence("dpo", "hellinger")
    with pytest.raises(ValueError, match="alpha"):
        losses.f_divergence("dpo", "alpha", alpha=1.5)


@pytest.mark.parametrize("divergence", ["forward_kl", "alpha", "js"])
def test_f_divergence_bf16_large_margin(divergence):
    big = jnp.bfloat16
    w, l = jnp.full((2, 3), -1e-3, big), jnp.full((2, 3), -400.0, big)
    inputs = losses.PairwiseInputs(logps_w_pc=jnp.concatenate([w, l]),
                                   logps_l_pc=jnp.concatenate([l, w]),
                                   mask_w_pc=jnp.ones((4, 3), big), mask_l_pc=jnp.ones((4, 3), big),
                                   ref_logps_w_pc=jnp.concatenate([l, w]),
                                   ref_logps_l_pc=jnp.concatenate([w, l]))
    fn = losses.f_divergence("dpo", divergence)
    g = jax.grad(lambda x: losses.mean_loss(fn(inputs.replace(logps_w_pc=x))))(inputs.logps_w_pc)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", ["dpo", "ipo", "cpo", "tgdpo"])
def test_ld_dpo_alpha_one_is_plain(name):
    close(losses.ld_dpo(name, alpha=1.0)(INPUTS).loss_p, losses.get(name)(INPUTS).loss_p)


def _ld_sum(logps, mask, shared, alpha):
    out = np.zeros(len(logps))
    for p in range(len(logps)):
        seen = 0
        for t in range(logps.shape[1]):
            if mask[p, t]:
                seen += 1
                out[p] += logps[p, t] * (1.0 if seen <= shared[p] else alpha)
    return out


def test_ld_dpo_matches_numpy():
    alpha = 0.4
    shared = np.minimum(CASE["mw"].sum(1), CASE["ml"].sum(1))
    hat = lambda key, mkey: _ld_sum(CASE[key], CASE[mkey], shared, alpha)  # noqa: E731
    h = (hat("lw", "mw") - hat("rw", "mw")) - (hat("ll", "ml") - hat("rl", "ml"))
    want = finish(-logsig(0.1 * h), CASE)
    close(losses.ld_dpo("dpo", alpha)(INPUTS).loss_p, want)


def _wpo_weight(logps, mask, logits):
    logp_v = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    log_p2 = np.log(np.exp(2 * logp_v).sum(-1))
    return np.exp(((logps - log_p2) * mask).sum(-1) / mask.sum(-1))


def test_wpo_matches_numpy_and_precomputed():
    w = (_wpo_weight(CASE["lw"], CASE["mw"], CASE["zw"])
         * _wpo_weight(CASE["ll"], CASE["ml"], CASE["zl"]))
    want = REFERENCES["dpo"](CASE) * np.where(CASE["valid"] > 0, w, 0.0)
    close(losses.wpo("dpo")(INPUTS).loss_p, want, rtol=1e-4)
    log_p2 = lambda z: jax.nn.logsumexp(2 * jax.nn.log_softmax(z, -1), -1)  # noqa: E731
    pre = INPUTS.replace(logits_w_pcv=None, logits_l_pcv=None,
                         extras={**INPUTS.extras, "log_sum_p2_w_pc": log_p2(INPUTS.logits_w_pcv),
                                 "log_sum_p2_l_pc": log_p2(INPUTS.logits_l_pcv)})
    close(losses.wpo("dpo")(pre).loss_p, want, rtol=1e-4)


def test_wpo_weights_carry_no_gradient():
    fn = losses.wpo("dpo")

    def loss(logps_w, logits_w):
        return losses.mean_loss(fn(INPUTS.replace(logps_w_pc=logps_w, logits_w_pcv=logits_w)))

    g_logps, g_logits = jax.grad(loss, argnums=(0, 1))(INPUTS.logps_w_pc, INPUTS.logits_w_pcv)
    assert np.all(np.asarray(g_logits) == 0.0)
    # d/d logps: only through the dpo term, scaled by the weights held constant.
    weight_p = jnp.exp(
        modifiers.wpo_log_weight(INPUTS.logps_w_pc, INPUTS.mask_w_pc, INPUTS.logits_w_pcv, None)
        + modifiers.wpo_log_weight(INPUTS.logps_l_pc, INPUTS.mask_l_pc, INPUTS.logits_l_pcv, None))

    def held(x):
        out = losses.get("dpo")(INPUTS.replace(logps_w_pc=x))
        return jnp.sum(out.loss_p * weight_p) / out.metrics["loss"][1]

    close(g_logps, jax.grad(held)(INPUTS.logps_w_pc), rtol=1e-4)


def test_reference_free_drops_reference():
    zero_ref = INPUTS.replace(ref_logps_w_pc=jnp.zeros_like(INPUTS.ref_logps_w_pc),
                              ref_logps_l_pc=jnp.zeros_like(INPUTS.ref_logps_l_pc))
    close(losses.reference_free("dpo")(INPUTS).loss_p, losses.get("dpo")(zero_ref).loss_p)
    assert "ref_logps/chosen" not in losses.reference_free("dpo")(INPUTS).metrics


def test_modifiers_compose():
    """ld_dpo(wpo(f_divergence(dpo, js))) == numpy JS-DPO on LD sums, times WPO weights."""
    alpha = 0.5
    shared = np.minimum(CASE["mw"].sum(1), CASE["ml"].sum(1))
    hat = lambda key, mkey: _ld_sum(CASE[key], CASE[mkey], shared, alpha)  # noqa: E731
    psi = lambda d: np.log(2) + logsig(d)  # noqa: E731
    h = psi(hat("lw", "mw") - hat("rw", "mw")) - psi(hat("ll", "ml") - hat("rl", "ml"))
    w = (_wpo_weight(CASE["lw"], CASE["mw"], CASE["zw"])
         * _wpo_weight(CASE["ll"], CASE["ml"], CASE["zl"]))
    want = finish(-logsig(0.1 * h) * w, CASE)
    fn = losses.ld_dpo(losses.wpo(losses.f_divergence("dpo", "js")), alpha)
    close(jax.jit(fn)(INPUTS).loss_p, want, rtol=1e-4)

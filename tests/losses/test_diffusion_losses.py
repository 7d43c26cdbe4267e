"""Diffusion objectives (prefopt_jax/losses/diffusion.py): independent numpy transcriptions on
hand-made tensors (filler rows of finite garbage, weights), hand-computed scalars, gradient
signs, filler rows inert, bfloat16 inputs.

The numpy references below are written from the formulas in each objective's docstring (the
papers and their released code), with python loops over examples, in float64; they do not call
the JAX code.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax.losses import diffusion as dl
from prefopt_jax.losses.base import mean_loss

GARBAGE = 777.0  # finite garbage in filler rows: must change nothing


def _split(fn, hyper):
    """(static hyper-parameters as a hashable key, numeric ones as traced values), defaults
    filled in so that calls differing only in numbers share one compilation."""
    params = inspect.signature(fn).parameters.values()
    hyper = {**{p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}, **hyper}
    dynamic = {k: np.asarray(v) for k, v in hyper.items()
               if type(v) in (float, int) and k != "group_size"}
    return tuple(sorted((k, v) for k, v in hyper.items() if k not in dynamic)), dynamic


@functools.lru_cache(maxsize=None)
def _jitted(fn, static):
    return jax.jit(lambda inputs, dynamic: fn(inputs, **dict(static), **dynamic))


def run(fn, inputs, **hyper):
    """fn(inputs, **hyper) under jit, numeric hyper-parameters traced (far quicker than
    op-by-op dispatch, and one compilation serves every beta)."""
    static, dynamic = _split(fn, hyper)
    return _jitted(fn, static)(inputs, dynamic)


@functools.lru_cache(maxsize=None)
def _jitted_grad(fn, fields, static):
    def total(values, inputs, dynamic):
        inputs = inputs.replace(**dict(zip(fields, values)))
        return jnp.sum(fn(inputs, **dict(static), **dynamic).loss_p)
    return jax.jit(jax.grad(total))


def grads(fn, inputs, fields, **hyper):
    """d(sum of fn's per-example losses)/d(field) for each field named, under jit."""
    static, dynamic = _split(fn, hyper)
    values = [getattr(inputs, f) for f in fields]
    return [np.asarray(g) for g in _jitted_grad(fn, tuple(fields), static)(values, inputs,
                                                                             dynamic)]


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def logsig(x):
    return -softplus(-x)


def a32(x):
    # numpy, not jnp: jit takes numpy arguments as they are, while jnp.asarray compiles a
    # staging program for every new shape (a third of this file's compilations)
    return np.asarray(x, np.float32)


def mean_of(loss_x, valid):
    """The training loss as mean_loss computes it: sum over real rows / number of them."""
    return float(np.sum(loss_x)) / max(float(np.sum(valid)), 1.0)


# ----------------------------------------------------------------------------- numpy references

def np_diffusion_dpo(ew, el, rw, rl, valid, weight, beta):
    out = np.zeros(len(ew))
    for i in range(len(ew)):
        if valid[i]:
            z = -0.5 * beta * ((ew[i] - rw[i]) - (el[i] - rl[i]))
            out[i] = weight[i] * softplus(-z)
    return out


def np_seppo(ew, el, rw, rl, valid, weight, beta, kind="sign"):
    out = np.zeros(len(ew))
    for i in range(len(ew)):
        if valid[i]:
            x = rw[i] - ew[i]  # reference error minus policy error on the winning image
            m = (1.0 if x > 0 else -1.0 if x < 0 else 0.0) if kind == "sign" else float(x > 0)
            z = -0.5 * beta * ((ew[i] - rw[i]) - m * (el[i] - rl[i]))
            out[i] = weight[i] * softplus(-z)
    return out


def np_kto(e, r, label, valid, weight, beta, lam_d=1.0, lam_u=1.0, z0=None):
    rew = [-beta * (e[i] - r[i]) for i in range(len(e))]
    if z0 is None:
        real = [rew[i] for i in range(len(e)) if valid[i]]
        z0 = max(0.0, sum(real) / len(real))
    out = np.zeros(len(e))
    for i in range(len(e)):
        if valid[i]:
            u = lam_d * (1 - sig(rew[i] - z0)) if label[i] else lam_u * (1 - sig(z0 - rew[i]))
            out[i] = weight[i] * u
    return out, z0


def np_rank_dpo(e, r, psi, item, valid, weight, beta, dcg=True):
    out = np.zeros(len(e))
    for p in range(len(e)):
        if not valid[p]:
            continue
        real = [k for k in range(len(e[p])) if item[p][k]]
        u = {k: -0.5 * beta * (e[p][k] - r[p][k]) for k in real}
        order = sorted(real, key=lambda k: (-u[k], k))  # descending reward, ties by position
        tau = {k: order.index(k) + 1 for k in real}
        total = 0.0
        for i in real:
            for j in real:
                if psi[p][i] > psi[p][j]:
                    delta = (abs(2 ** psi[p][i] - 2 ** psi[p][j])
                             * abs(1 / math.log(1 + tau[i]) - 1 / math.log(1 + tau[j])))
                    total += (delta if dcg else 1.0) * logsig(u[i] - u[j])
        out[p] = -weight[p] * total
    return out


def np_d3po(logp, ref, mask, rewards, valid, weight, beta, clip):
    def c(x):  # log of the clipped ratio
        return math.log(min(max(math.exp(x), 1 - clip), 1 + clip))

    n_pairs = len(logp) // 2
    out, real = np.zeros(n_pairs), np.zeros(n_pairs)
    for p in range(n_pairs):
        a, b = 2 * p, 2 * p + 1
        if not (valid[a] and valid[b]) or rewards[a] == rewards[b]:
            continue
        w, lo = (a, b) if rewards[a] > rewards[b] else (b, a)
        steps = [s for s in range(len(logp[a])) if mask[a][s] and mask[b][s]]
        if not steps:
            continue
        terms = [softplus(-beta * (c(logp[w][s] - ref[w][s]) - c(logp[lo][s] - ref[lo][s])))
                 for s in steps]
        out[p] = (weight[a] + weight[b]) / 2 * sum(terms) / len(terms)
        real[p] = 1.0
    return out, real


def np_ddpo_advantages(rewards, valid, prompt, min_count=2, std_eps=1e-6):
    """DDPO's PerPromptStatTracker.update with empty buffers, on the real rows."""
    rows = [i for i in range(len(rewards)) if valid[i]]
    batch = np.array([rewards[i] for i in rows], np.float64)
    adv = np.zeros(len(rewards))
    for q in set(prompt[i] for i in rows):
        mine = [i for i in rows if prompt[i] == q]
        pr = np.array([rewards[i] for i in mine], np.float64)
        if len(pr) < min_count:
            mean, std = np.mean(batch), np.std(batch) + std_eps
        else:
            mean, std = np.mean(pr), np.std(pr) + std_eps
        for i in mine:
            adv[i] = (rewards[i] - mean) / std
    return adv


def np_ddpo(logp, old, mask, rewards, valid, prompt, weight, form="is", eps=1e-4, adv_clip=5.0,
            min_count=2):
    adv = np.clip(np_ddpo_advantages(rewards, valid, prompt, min_count), -adv_clip, adv_clip)
    out = np.zeros(len(logp))
    for i in range(len(logp)):
        if not valid[i]:
            continue
        steps = [s for s in range(len(logp[i])) if mask[i][s]]
        if form == "sf":
            out[i] = -adv[i] * sum(logp[i][s] for s in steps)
        else:
            terms = []
            for s in steps:
                rho = math.exp(logp[i][s] - old[i][s])
                terms.append(max(-adv[i] * rho, -adv[i] * min(max(rho, 1 - eps), 1 + eps)))
            out[i] = sum(terms) / max(len(terms), 1)
        out[i] *= weight[i]
    return out, adv


# ---------------------------------------------------------------------------- hand-made tensors

def pair_case(p=6, seed=0):
    """Pairs with errors near 1 (eps-prediction MSE); the last two rows are filler garbage."""
    rng = np.random.default_rng(seed)
    c = {k: rng.uniform(0.6, 1.4, p) for k in ("ew", "el", "rw", "rl")}
    c["rw"] = c["ew"] + rng.normal(0, 0.2, p)
    c["rl"] = c["el"] + rng.normal(0, 0.2, p)
    c["valid"] = np.array([1.0] * (p - 2) + [0.0, 0.0])
    c["weight"] = rng.uniform(0.5, 2.0, p)
    for k in ("ew", "el", "rw", "rl"):
        c[k][-2:] = [GARBAGE, -GARBAGE]
    return c


def pair_inputs(c, dtype=np.float32):
    cast = lambda x: np.asarray(x, dtype)  # noqa: E731
    return dl.DenoisingInputs(err_w_p=cast(c["ew"]), err_l_p=cast(c["el"]),
                              ref_err_w_p=cast(c["rw"]), ref_err_l_p=cast(c["rl"]),
                              valid_p=cast(c["valid"]), weight_p=cast(c["weight"]))


def kto_case():
    c = pair_case(8, seed=1)
    return {"e": c["ew"], "r": c["rw"], "valid": c["valid"], "weight": c["weight"],
            "label": np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)}


def kto_inputs(c, dtype=np.float32):
    cast = lambda x: np.asarray(x, dtype)  # noqa: E731
    return dl.DenoisingUnpairedInputs(err_n=cast(c["e"]), ref_err_n=cast(c["r"]),
                                      label_n=np.asarray(c["label"]), valid_n=cast(c["valid"]),
                                      weight_n=cast(c["weight"]))


def list_case():
    rng = np.random.default_rng(2)
    p, k = 4, 4
    e = rng.uniform(0.6, 1.4, (p, k))
    c = {"e": e, "r": e + rng.normal(0, 0.3, (p, k)), "psi": rng.uniform(0, 1, (p, k)),
         "item": np.ones((p, k)), "valid": np.array([1.0, 1.0, 1.0, 0.0]),
         "weight": rng.uniform(0.5, 2.0, p)}
    c["psi"][1, 2] = c["psi"][1, 0]  # a label tie: no pair either way
    c["item"][2, 3] = 0.0  # a padded item of a shorter list
    for k_ in ("e", "r", "psi"):
        c[k_][2, 3] = GARBAGE
        c[k_][3] = GARBAGE  # the filler list
    return c


def list_inputs(c, dtype=np.float32):
    cast = lambda x: np.asarray(x, dtype)  # noqa: E731
    return dl.DenoisingListInputs(err_pk=cast(c["e"]), ref_err_pk=cast(c["r"]),
                                  scores_pk=cast(c["psi"]), item_valid_pk=cast(c["item"]),
                                  valid_p=cast(c["valid"]), weight_p=cast(c["weight"]))


def traj_case():
    """5 pairs x 3 steps. Pair 2 is a reward tie, pair 4 has a filler row; some steps masked.

    Log-ratios against the reference span +-0.3, so some steps fall outside D3PO's clip band
    and others inside it; the behaviour policy is close to the policy (DDPO's ratios near 1).
    """
    rng = np.random.default_rng(3)
    n, s = 10, 3
    logp = rng.normal(-3.0, 1.0, (n, s))
    c = {"logp": logp, "ref": logp + rng.uniform(-0.3, 0.3, (n, s)),
         "old": logp + rng.uniform(-2e-4, 2e-4, (n, s)), "mask": np.ones((n, s)),
         "rewards": rng.normal(0, 1, n), "valid": np.ones(n), "weight": rng.uniform(0.5, 2, n),
         "prompt": np.array([0, 0, 1, 1, 2, 2, 0, 3, 1, 4])}
    c["rewards"][5] = c["rewards"][4]
    c["mask"][0, 2] = c["mask"][7, 0] = 0.0
    c["valid"][9] = 0.0
    for k in ("logp", "ref", "old"):
        c[k][9] = -GARBAGE
    c["rewards"][9] = GARBAGE
    return c


def traj_inputs(c, dtype=np.float32, **fields):
    cast = lambda x: np.asarray(x, dtype)  # noqa: E731
    base = dict(logps_ns=cast(c["logp"]), mask_ns=cast(c["mask"]), rewards_n=cast(c["rewards"]),
                ref_logps_ns=cast(c["ref"]), old_logps_ns=cast(c["old"]),
                prompt_id_n=np.asarray(c["prompt"]), valid_n=cast(c["valid"]),
                weight_n=cast(c["weight"]))
    base.update(fields)
    return dl.TrajectoryInputs(**base)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------ against numpy refs

@pytest.mark.parametrize("beta", [5.0, 40.0])
def test_diffusion_dpo_matches_numpy(beta):
    c = pair_case()
    out = run(dl.diffusion_dpo, pair_inputs(c), beta=beta)
    ref = np_diffusion_dpo(c["ew"], c["el"], c["rw"], c["rl"], c["valid"], c["weight"], beta)
    close(out.loss_p, ref)
    close(mean_loss(out), mean_of(ref, c["valid"]))
    real = c["valid"] > 0
    z = -0.5 * beta * ((c["ew"] - c["rw"]) - (c["el"] - c["rl"]))
    s, n = out.metrics["rewards/accuracy"]
    assert float(n) == real.sum() and float(s) == (z[real] > 0).sum()
    close(out.metrics["rewards/margin"][0], z[real].sum(), rtol=1e-5)
    assert 0 < (z[real] > 0).sum() < real.sum()  # the case has both right and wrong pairs


@pytest.mark.parametrize("kind", ["sign", "indicator"])
def test_seppo_matches_numpy(kind):
    c = pair_case(seed=4)
    out = run(dl.seppo, pair_inputs(c), beta=8.0, flipper=kind)
    close(out.loss_p, np_seppo(c["ew"], c["el"], c["rw"], c["rl"], c["valid"], c["weight"], 8.0,
                               kind))
    flips = (c["rw"] - c["ew"])[c["valid"] > 0]
    assert (flips > 0).any() and (flips < 0).any()  # both branches of the flipper are exercised


@pytest.mark.parametrize("z0", [None, 0.3])
def test_diffusion_kto_matches_numpy(z0):
    c = kto_case()
    out = run(dl.diffusion_kto, kto_inputs(c), beta=3.0, lam_desirable=1.3, lam_undesirable=0.7,
                           z0=z0)
    ref, ref_z0 = np_kto(c["e"], c["r"], c["label"], c["valid"], c["weight"], 3.0, 1.3, 0.7, z0)
    close(out.loss_p, ref)
    close(out.metrics["kto/z0"][0], ref_z0)
    close(mean_loss(out), mean_of(ref, c["valid"]))


def test_diffusion_kto_batch_z0_is_clamped_at_zero():
    c = kto_case()
    c["r"] = c["e"] - 0.5  # every reward -b/2 < 0: the batch mean is negative, z0 = 0
    out = run(dl.diffusion_kto, kto_inputs(c), beta=2.0)
    assert float(out.metrics["kto/z0"][0]) == 0.0
    close(out.loss_p, np_kto(c["e"], c["r"], c["label"], c["valid"], c["weight"], 2.0)[0])


@pytest.mark.parametrize("dcg", [True, False])
def test_rank_dpo_matches_numpy(dcg):
    c = list_case()
    out = run(dl.rank_dpo, list_inputs(c), beta=4.0, dcg_weights=dcg)
    ref = np_rank_dpo(c["e"], c["r"], c["psi"], c["item"], c["valid"], c["weight"], 4.0, dcg)
    close(out.loss_p, ref, rtol=1e-5)
    close(mean_loss(out), mean_of(ref, c["valid"]), rtol=1e-5)


def test_rank_dpo_without_dcg_is_diffusion_dpo_over_all_pairs():
    c = list_case()
    out = run(dl.rank_dpo, list_inputs(c), beta=4.0, dcg_weights=False)
    p = 0  # a full list with distinct labels: K (K - 1) / 2 ordered pairs
    e, r, psi = c["e"][p], c["r"][p], c["psi"][p]
    pairs = [(i, j) for i in range(4) for j in range(4) if psi[i] > psi[j]]
    assert len(pairs) == 6
    total = sum(np_diffusion_dpo([e[i]], [e[j]], [r[i]], [r[j]], [1], [1], 4.0)[0]
                for i, j in pairs)
    close(out.loss_p[p], c["weight"][p] * total)


@pytest.mark.parametrize("beta,clip", [(0.1, 0.1), (2.0, 0.05)])
def test_d3po_matches_numpy(beta, clip):
    c = traj_case()
    out = run(dl.d3po, traj_inputs(c), beta=beta, clip=clip)
    ref, real = np_d3po(c["logp"], c["ref"], c["mask"], c["rewards"], c["valid"], c["weight"],
                        beta, clip)
    close(out.loss_p, ref)
    close(out.metrics["loss"][1], real.sum())
    assert real.tolist() == [1, 1, 0, 1, 0]  # the tie and the pair with a filler row drop out
    d = np.abs(c["logp"] - c["ref"])[c["valid"] > 0]
    assert (d > -math.log1p(-clip)).any() and (d < math.log1p(clip)).any()  # both sides


@pytest.mark.parametrize("form", ["is", "sf"])
@pytest.mark.parametrize("min_count", [2, 3])
def test_ddpo_matches_numpy(form, min_count):
    c = traj_case()
    out = run(dl.ddpo, traj_inputs(c), form=form, min_count=min_count)
    ref, adv = np_ddpo(c["logp"], c["old"], c["mask"], c["rewards"], c["valid"], c["prompt"],
                       c["weight"], form, min_count=min_count)
    close(out.loss_p, ref, rtol=1e-4, atol=1e-5)
    close(out.metrics["advantages/mean"][0], adv.sum(), rtol=1e-4, atol=1e-4)
    close(mean_loss(out), mean_of(ref, c["valid"]), rtol=1e-4, atol=1e-5)


def test_ddpo_group_size_equals_explicit_prompt_ids():
    c = traj_case()
    c["prompt"] = np.arange(10) // 5
    by_ids = run(dl.ddpo, traj_inputs(c), form="sf")
    by_groups = run(dl.ddpo, traj_inputs(c, prompt_id_n=None), form="sf", group_size=5)
    close(by_groups.loss_p, np.asarray(by_ids.loss_p))
    ref, _ = np_ddpo(c["logp"], c["old"], c["mask"], c["rewards"], c["valid"], c["prompt"],
                     c["weight"], "sf")
    close(by_groups.loss_p, ref, rtol=1e-4, atol=1e-5)


def test_ddpo_uses_given_advantages_clipped():
    c = traj_case()
    adv = np.linspace(-8, 8, 10)
    out = run(dl.ddpo, traj_inputs(c, advantages_n=a32(adv)), form="sf", adv_clip=5.0)
    a = np.clip(adv, -5, 5)
    want = np.where(c["valid"] > 0, -a * (c["logp"] * c["mask"]).sum(-1) * c["weight"], 0.0)
    close(out.loss_p, want, rtol=1e-5)


# ------------------------------------------------------------------- hand-computed scalars

def test_hand_diffusion_dpo():
    # D_w = 0.5 - 0.6 = -0.1, D_l = 0.7 - 0.65 = 0.05, logit = -(2/2)(-0.1 - 0.05) = 0.15
    i = dl.DenoisingInputs(a32([0.5]), a32([0.7]), a32([0.6]), a32([0.65]))
    out = run(dl.diffusion_dpo, i, beta=2.0)
    close(out.loss_p, [math.log1p(math.exp(-0.15))])
    close(out.metrics["rewards/margin"][0], 0.15)
    assert float(out.metrics["rewards/accuracy"][0]) == 1.0


def test_hand_seppo_and_anchor_sign():
    m = dl.seppo_anchor_sign(a32([0.5, 0.7, 0.6]), a32([0.6, 0.6, 0.6]))
    assert m.tolist() == [1.0, -1.0, 0.0]  # policy better on x_w, reference better, a tie
    m = dl.seppo_anchor_sign(a32([0.5, 0.7, 0.6]), a32([0.6, 0.6, 0.6]), "indicator")
    assert m.tolist() == [1.0, 0.0, 0.0]
    # policy worse on x_w (D_w = 0.1, m = -1), reference sample D_l = 0.4 - 0.7 = -0.3:
    # logit = -(2/2)(0.1 - (-1)(-0.3)) = 0.2
    i = dl.DenoisingInputs(a32([0.7]), a32([0.4]), a32([0.6]), a32([0.7]))
    close(run(dl.seppo, i, beta=2.0).loss_p, [softplus(-0.2)])
    # indicator: m = 0, the reference term drops: logit = -(0.1) = -0.1
    close(run(dl.seppo, i, beta=2.0, flipper="indicator").loss_p, [softplus(0.1)])


def test_hand_diffusion_kto():
    # b = 10: desirable r = -10 (0.1 - 0.2) = 1, undesirable r = -10 (0.3 - 0.2) = -1; z0 = 0
    i = dl.DenoisingUnpairedInputs(a32([0.1, 0.3]), a32([0.2, 0.2]), np.asarray([True, False]))
    close(run(dl.diffusion_kto, i, beta=10.0).loss_p, [1 - sig(1.0), 1 - sig(1.0)])
    close(run(dl.diffusion_kto, i, beta=10.0, z0=0.5).loss_p, [1 - sig(0.5), 1 - sig(1.5)])
    # rewards 2 and 0: z0 = max(0, 1) = 1
    i = dl.DenoisingUnpairedInputs(a32([0.0, 0.2]), a32([0.2, 0.2]), np.asarray([True, False]))
    close(run(dl.diffusion_kto, i, beta=10.0).loss_p, [1 - sig(1.0), 1 - sig(1.0)])


def test_hand_rank_dpo():
    # b = 2: u = -(e - e_ref) = [0, 1, 2]: the model ranks the list exactly backwards.
    # tau = [3, 2, 1]; gains 2^psi - 1 = [1, sqrt2 - 1, 0]; labelled pairs (0,1), (0,2), (1,2).
    i = dl.DenoisingListInputs(err_pk=a32([[3.0, 2.0, 1.0]]), ref_err_pk=a32([[3.0, 3.0, 3.0]]),
                               scores_pk=a32([[1.0, 0.5, 0.0]]))
    inv = [1 / math.log(4), 1 / math.log(3), 1 / math.log(2)]
    g = [1.0, math.sqrt(2) - 1, 0.0]
    want = -((g[0] - g[1]) * (inv[1] - inv[0]) * logsig(-1.0)
             + (g[0] - g[2]) * (inv[2] - inv[0]) * logsig(-2.0)
             + (g[1] - g[2]) * (inv[2] - inv[1]) * logsig(-1.0))
    out = run(dl.rank_dpo, i, beta=2.0)
    close(out.loss_p, [want])
    assert float(out.metrics["rewards/accuracy"][0]) == 0.0


def test_hand_d3po():
    # one pair, second trajectory wins; log-ratios loser [0.05, 0.5], winner [-0.02, 0.0];
    # band [log 0.9, log 1.1]: 0.5 clips to log 1.1. h = 0.1 (c_w - c_l).
    i = dl.TrajectoryInputs(logps_ns=a32([[-1.0, -2.0], [-1.5, -1.0]]),
                            mask_ns=a32([[1, 1], [1, 1]]), rewards_n=a32([0.0, 1.0]),
                            ref_logps_ns=a32([[-1.05, -2.5], [-1.48, -1.0]]))
    h0, h1 = 0.1 * (-0.02 - 0.05), 0.1 * (0.0 - math.log(1.1))
    out = run(dl.d3po, i)
    close(out.loss_p, [(softplus(-h0) + softplus(-h1)) / 2])
    close(out.metrics["d3po/clip_frac"][0], 1.0)  # one of the four step log-ratios is clipped


def test_hand_ddpo():
    # prompts [0, 0, 1, 1], rewards [1, 3, 2, 6]: A = [-1, 1, -1, 1] (population std 1 and 2).
    # SF: -A * sum_t log p with sums [-1, -2, -3, -4]: [-1, 2, -3, 4], mean 0.5.
    logp = a32([[-1.0, 0.0], [-1.0, -1.0], [-2.0, -1.0], [-4.0, 0.0]])
    i = dl.TrajectoryInputs(logps_ns=logp, mask_ns=a32(np.ones((4, 2))),
                            rewards_n=a32([1, 3, 2, 6]), prompt_id_n=np.asarray([0, 0, 1, 1]))
    out = run(dl.ddpo, i, form="sf")
    close(out.loss_p, [-1.0, 2.0, -3.0, 4.0], rtol=1e-5)
    close(mean_loss(out), 0.5, rtol=1e-5)
    # IS on-policy (rho = 1): each step's loss is -A
    close(run(dl.ddpo, i).loss_p, [1.0, -1.0, 1.0, -1.0], rtol=1e-5)
    # IS off-policy with rho = e^0.5 > 1 + 1e-4 and A = +1: the clipped term wins, -(1 + 1e-4)
    i = i.replace(old_logps_ns=logp - 0.5)
    close(run(dl.ddpo, i).loss_p[1], -(1 + 1e-4), rtol=1e-6)


def test_hand_ddpo_fallback_to_batch_statistics():
    # prompt 1 has one sample (< min_count 2): it uses the batch's mean 2 and std sqrt(2/3).
    i = dl.TrajectoryInputs(logps_ns=a32([[-1.0], [-1.0], [-1.0]]), mask_ns=a32(np.ones((3, 1))),
                            rewards_n=a32([1.0, 3.0, 2.0]), prompt_id_n=np.asarray([0, 0, 1]))
    out = run(dl.ddpo, i, form="sf")
    close(out.loss_p, [-1.0, 1.0, 0.0], atol=1e-5)
    i = i.replace(rewards_n=a32([1.0, 3.0, 4.0]))  # batch mean 8/3, std sqrt(14/9)
    close(run(dl.ddpo, i, form="sf").loss_p[2], (4 - 8 / 3) / math.sqrt(14 / 9), rtol=1e-5)


# ------------------------------------------------------------------------- gradient signs

def test_diffusion_dpo_gradient_signs():
    c = pair_case()
    gw, gl, grw = grads(dl.diffusion_dpo, pair_inputs(c),
                        ["err_w_p", "err_l_p", "ref_err_w_p"], beta=5.0)
    real = c["valid"] > 0
    assert (gw[real] > 0).all()  # lowering the policy's error on the chosen image lowers the loss
    assert (gl[real] < 0).all()  # raising it on the rejected image lowers the loss
    assert (gw[~real] == 0).all() and (gl[~real] == 0).all()  # filler: exactly no gradient
    assert (grw == 0).all()  # the reference is frozen


def test_seppo_gradient_follows_the_flipper_without_flowing_through_it():
    # row 0: policy better on x_w (m = +1), row 1: reference better (m = -1)
    i = dl.DenoisingInputs(a32([0.5, 0.7]), a32([0.4, 0.4]), a32([0.6, 0.6]), a32([0.7, 0.7]))
    gw, gl = grads(dl.seppo, i, ["err_w_p", "err_l_p"], beta=2.0)
    assert gl[0] < 0 < gl[1]  # the reference sample is pushed away (m = +1) or pulled (m = -1)
    # no gradient through m: d/dD_w of softplus((b/2)(D_w - m D_l)) with m held fixed
    for row, m in ((0, 1.0), (1, -1.0)):
        d_w, d_l = [0.5, 0.7][row] - 0.6, 0.4 - 0.7
        close(gw[row], sig(d_w - m * d_l), rtol=1e-5)


def test_diffusion_kto_gradient_signs_and_frozen_z0():
    c = kto_case()
    (g,) = grads(dl.diffusion_kto, kto_inputs(c), ["err_n"], beta=3.0)
    real, good = c["valid"] > 0, c["label"]
    assert (g[real & good] > 0).all()  # lowering the error of a desirable image lowers the loss
    assert (g[real & ~good] < 0).all()  # raising it on an undesirable one lowers the loss
    assert (g[~real] == 0).all()
    # z0 carries no gradient: each row's gradient is its own term's, z0 held fixed
    _, z0 = np_kto(c["e"], c["r"], c["label"], c["valid"], c["weight"], 3.0)
    for n in np.flatnonzero(real):
        x = -3.0 * (c["e"][n] - c["r"][n]) - z0
        sign = 1.0 if good[n] else -1.0
        close(g[n], sign * c["weight"][n] * 3.0 * sig(x) * (1 - sig(x)), rtol=1e-4)


def test_rank_dpo_gradient_signs():
    i = dl.DenoisingListInputs(err_pk=a32([[1.0, 1.0, 1.0]]), ref_err_pk=a32([[1.0, 1.0, 1.0]]),
                               scores_pk=a32([[0.9, 0.5, 0.1]]))
    (g,) = grads(dl.rank_dpo, i, ["err_pk"], beta=2.0)
    assert g[0, 0] > 0 > g[0, 2]  # lower error on the best image / higher on the worst helps


def test_d3po_gradient_signs_and_clip():
    # winner (row 1) step 0 inside the band, step 1 outside; loser (row 0) both inside
    i = dl.TrajectoryInputs(logps_ns=a32([[-1.0, -2.0], [-1.0, -1.0]]),
                            mask_ns=a32(np.ones((2, 2))), rewards_n=a32([0.0, 1.0]),
                            ref_logps_ns=a32([[-1.02, -2.03], [-1.01, -1.5]]))
    (g,) = grads(dl.d3po, i, ["logps_ns"])
    assert g[1, 0] < 0  # raising the winner's step log-prob lowers the loss
    assert (g[0] > 0).all()  # raising the loser's raises it
    assert g[1, 1] == 0  # a ratio outside [1 - clip, 1 + clip] gives no gradient


@pytest.mark.parametrize("form", ["is", "sf"])
def test_ddpo_gradient_signs(form):
    # prompt 0: rewards 0 < 1, so A = [-1, +1]; on-policy IS ratios are 1 (inside the band)
    i = dl.TrajectoryInputs(logps_ns=a32([[-1.0, -1.0], [-1.0, -1.0]]),
                            mask_ns=a32(np.ones((2, 2))), rewards_n=a32([0.0, 1.0]))
    (g,) = grads(dl.ddpo, i, ["logps_ns"], form=form)
    assert (g[1] < 0).all() and (g[0] > 0).all()
    # IS past the band with A = +1: no gradient (the clipped term is the minimum)
    i = i.replace(old_logps_ns=i.logps_ns - 0.5)
    if form == "is":
        (g,) = grads(dl.ddpo, i, ["logps_ns"])
        assert (g[1] == 0).all() and (g[0] > 0).all()


# --------------------------------------------------------------- filler rows and bfloat16

def _refill(case, where, **values):
    """A copy of the case with other garbage (or labels, ids) written where `where` says."""
    out = {k: np.array(v, copy=True) for k, v in case.items()}
    for key, value in values.items():
        out[key][where] = value
    return out


def _same_output(a, b):
    np.testing.assert_array_equal(np.asarray(a.loss_p), np.asarray(b.loss_p))
    assert a.metrics.keys() == b.metrics.keys()
    for name in a.metrics:
        assert [float(x) for x in a.metrics[name]] == [float(x) for x in b.metrics[name]], name


def test_filler_rows_change_nothing():
    """Other garbage, labels and prompt ids in the filler rows (and a padded list item) leave
    every loss and metric bit-identical and get exactly zero gradient."""
    c = pair_case()
    other = _refill(c, c["valid"] == 0, ew=-3e3, el=5.0, rw=0.0, rl=1e4, weight=9.0)
    for fn, beta in ((dl.diffusion_dpo, 5.0), (dl.seppo, 8.0)):
        _same_output(run(fn, pair_inputs(c), beta=beta), run(fn, pair_inputs(other), beta=beta))
    k = kto_case()
    hyper = dict(beta=3.0, lam_desirable=1.3, lam_undesirable=0.7, z0=None)
    other = _refill(k, k["valid"] == 0, e=-5e3, r=2.0, label=True, weight=0.1)
    _same_output(run(dl.diffusion_kto, kto_inputs(k), **hyper),
                 run(dl.diffusion_kto, kto_inputs(other), **hyper))
    lc = list_case()
    pad = np.zeros_like(lc["item"], bool)
    pad[3], pad[2, 3] = True, True
    other = _refill(lc, pad, e=-9.0, r=3e3, psi=50.0)
    _same_output(run(dl.rank_dpo, list_inputs(lc), beta=4.0),
                 run(dl.rank_dpo, list_inputs(other), beta=4.0))
    (g,) = grads(dl.rank_dpo, list_inputs(lc), ["err_pk"], beta=4.0)
    assert (g[pad] == 0).all() and (g[~pad] != 0).any()
    t = traj_case()
    other = _refill(t, t["valid"] == 0, logp=5.0, ref=-1e3, old=1e3, rewards=-1e4, prompt=0,
                    mask=0.0)
    for fn, hyper in ((dl.d3po, dict(beta=0.1, clip=0.1)), (dl.ddpo, dict(form="is")),
                      (dl.ddpo, dict(form="sf"))):
        _same_output(run(fn, traj_inputs(t), **hyper), run(fn, traj_inputs(other), **hyper))
        (g,) = grads(fn, traj_inputs(t), ["logps_ns"], **hyper)
        assert (g[9] == 0).all() and (g[:8] != 0).any()


def _every_objective(dtype):
    return [
        run(dl.diffusion_dpo, pair_inputs(pair_case(), dtype)),
        run(dl.seppo, pair_inputs(pair_case(), dtype)),
        run(dl.diffusion_kto, kto_inputs(kto_case(), dtype)),
        run(dl.rank_dpo, list_inputs(list_case(), dtype)),
        run(dl.d3po, traj_inputs(traj_case(), dtype)),
        run(dl.ddpo, traj_inputs(traj_case(), dtype)),
        run(dl.ddpo, traj_inputs(traj_case(), dtype), form="sf"),
    ]


def test_bfloat16_inputs_give_finite_float32_losses_and_metrics():
    """Default betas (5000 for the denoising losses: saturated logits) on bf16 inputs."""
    for out in _every_objective(jnp.bfloat16):
        assert out.loss_p.dtype == jnp.float32
        assert np.isfinite(np.asarray(out.loss_p)).all()
        assert np.isfinite(float(mean_loss(out)))
        for name, (total, count) in out.metrics.items():
            assert total.dtype == jnp.float32 and count.dtype == jnp.float32, name
            assert np.isfinite(float(total)) and np.isfinite(float(count)), name


def test_bfloat16_gradients_are_finite():
    g = grads(dl.diffusion_dpo, pair_inputs(pair_case(), jnp.bfloat16), ["err_w_p", "err_l_p"])
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in g)
    (g,) = grads(dl.d3po, traj_inputs(traj_case(), jnp.bfloat16), ["logps_ns"])
    assert np.isfinite(np.asarray(g, np.float32)).all() and (np.asarray(g) != 0).any()


def test_bad_hyper_parameters_and_inputs_are_refused():
    with pytest.raises(ValueError, match="form"):
        run(dl.ddpo, traj_inputs(traj_case()), form="ppo")
    with pytest.raises(ValueError, match="flipper"):
        run(dl.seppo, pair_inputs(pair_case()), flipper="maybe")
    with pytest.raises(ValueError, match="pairs"):
        run(dl.d3po, traj_inputs({k: v[:9] for k, v in traj_case().items()}))
    with pytest.raises(KeyError, match="ref_logps_ns"):
        run(dl.d3po, traj_inputs(traj_case(), ref_logps_ns=None))
    with pytest.raises(ValueError, match="group_size"):
        run(dl.ddpo, traj_inputs(traj_case(), prompt_id_n=None), group_size=3)


def test_objectives_are_registered_with_their_declarations():
    import prefopt_jax.losses as losses
    for name, (fn, decl) in dl.OBJECTIVES.items():
        assert losses.get(name) is fn and losses.info(name).inputs == decl["inputs"], name
        assert decl["inputs"] in losses.DIFFUSION_INPUTS and fn.__doc__.splitlines()[0].strip()
    assert losses.info("seppo").needs == ("reference_samples",)


def test_diffusion_mse_is_the_weighted_mean_error_of_real_images():
    err = np.asarray([0.5, 2.0, GARBAGE, 1.0], np.float32)
    valid = np.asarray([1, 1, 0, 1], np.float32)
    weight = np.asarray([1.0, 0.5, 3.0, 2.0], np.float32)
    out = dl.diffusion_mse(dl.ImageInputs(jnp.asarray(err), valid, weight))
    np.testing.assert_allclose(np.asarray(out.loss_p), [0.5, 1.0, 0.0, 2.0])
    assert float(mean_loss(out)) == pytest.approx((0.5 + 1.0 + 2.0) / 3)
    grad = jax.grad(lambda e: mean_loss(dl.diffusion_mse(dl.ImageInputs(e, valid))))(
        jnp.asarray(err))
    np.testing.assert_allclose(np.asarray(grad), [1 / 3, 1 / 3, 0.0, 1 / 3], rtol=1e-6)

"""Independent numpy (float64) transcriptions of the formulas (docs/objectives.md), written apart
from the JAX code.

Each `ref_<name>(case, **hyper)` takes a case dict from losses_cases.py and returns the
per-example loss with filler examples at 0 (and, for stateful losses, the new state). Batch
statistics are computed over the REAL examples only, by first selecting them.
"""

import numpy as np


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def logsig(x):
    return -np.logaddexp(0.0, -x)


def softplus(x):
    return np.logaddexp(0.0, x)


def seq(case, which, ref=False):
    """Masked sequence sum L and length for side 'w' or 'l'."""
    logps = case[("r" if ref else "l") + which]
    mask = case["m" + which]
    return (logps * mask).sum(-1), mask.sum(-1)


def sums(case):
    lw, nw = seq(case, "w")
    ll, nl = seq(case, "l")
    rw, _ = seq(case, "w", ref=True)
    rl, _ = seq(case, "l", ref=True)
    return lw, ll, rw, rl, np.maximum(nw, 1), np.maximum(nl, 1)


def finish(loss, case):
    return np.where(case["valid"] > 0, loss * case["weight"], 0.0)


def pairwise(fn):
    """Decorate fn(case, **hyper) -> loss over ALL pairs; mask filler and weight."""
    def wrapped(case, **hyper):
        with np.errstate(over="ignore", invalid="ignore"):  # garbage in filler pairs
            return finish(fn(case, **hyper), case)
    return wrapped


def h_sum(case):
    lw, ll, rw, rl, _, _ = sums(case)
    return (lw - rw) - (ll - rl)


def h_mean(case):
    lw, ll, rw, rl, nw, nl = sums(case)
    return (lw - rw) / nw - (ll - rl) / nl


@pairwise
def ref_dpo(case, beta=0.1, label_smoothing=0.0):
    z = beta * h_sum(case)
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


@pairwise
def ref_robust(case, beta=0.1, label_smoothing=0.1):
    e, z = label_smoothing, beta * h_sum(case)
    return ((1 - e) * -logsig(z) - e * -logsig(-z)) / (1 - 2 * e)


@pairwise
def ref_ipo(case, beta=0.1):
    return (h_mean(case) - 1 / (2 * beta)) ** 2


@pairwise
def ref_hinge(case, beta=0.1):
    return np.maximum(0.0, 1 - beta * h_sum(case))


@pairwise
def ref_slic(case, delta=1.0, lam=0.5):
    lw, ll, _, _, _, _ = sums(case)
    return np.maximum(0.0, delta - lw + ll) + lam * (-lw)


@pairwise
def ref_exo_pair(case, beta=0.1, epsilon=1e-3):
    z = beta * h_sum(case)
    return (sig(z) * (logsig(z) - np.log(1 - epsilon))
            + sig(-z) * (logsig(-z) - np.log(epsilon)))


@pairwise
def ref_nca_pair(case, beta=0.1):
    lw, ll, rw, rl, _, _ = sums(case)
    dw, dl = beta * (lw - rw), beta * (ll - rl)
    return -logsig(dw) - 0.5 * logsig(-dw) - 0.5 * logsig(-dl)


def ref_bco_pair(case, beta=0.1, state=None):
    lw, ll, rw, rl, _, _ = sums(case)
    real = case["valid"] > 0
    rew_w, rew_l = beta * (lw - rw), beta * (ll - rl)
    seen = np.concatenate([rew_w[real], rew_l[real]])
    m, count = _running(seen, state)
    loss = -logsig(rew_w - m) - logsig(-(rew_l - m))
    return finish(loss, case), {"mean": m, "count": count}


def _running(values, state):
    old_mean, old_count = (0.0, 0.0) if state is None else (state["mean"], state["count"])
    count = old_count + len(values)
    return (old_mean * old_count + values.sum()) / count, count


@pairwise
def ref_sppo_hard(case, beta=0.1):
    lw, ll, rw, rl, _, _ = sums(case)
    return (lw - rw - 1 / (2 * beta)) ** 2 + (ll - rl + 1 / (2 * beta)) ** 2


def _rank_paired(a, b, case, beta, label_smoothing):
    """Sort a, b separately over real pairs; loss of rank i goes to the pair with a's rank i."""
    out = np.zeros(len(a))
    real = np.flatnonzero(case["valid"] > 0)
    order = real[np.argsort(a[real])]
    b_sorted = np.sort(b[real])
    for rank, idx in enumerate(order):
        z = beta * (a[idx] - b_sorted[rank])
        out[idx] = -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
    return out * case["weight"]


def ref_aot(case, beta=0.1, label_smoothing=0.0):
    lw, ll, rw, rl, _, _ = sums(case)
    return _rank_paired(lw - ll, rw - rl, case, beta, label_smoothing)


def ref_aot_unpaired(case, beta=0.1, label_smoothing=0.0):
    lw, ll, rw, rl, _, _ = sums(case)
    return _rank_paired(lw - rw, ll - rl, case, beta, label_smoothing)


@pairwise
def ref_apo_zero(case, beta=0.1):
    lw, ll, rw, rl, _, _ = sums(case)
    return (1 - sig(beta * (lw - rw))) + sig(beta * (ll - rl))


@pairwise
def ref_apo_down(case, beta=0.1):
    lw, ll, rw, rl, _, _ = sums(case)
    dw, dl = lw - rw, ll - rl
    return sig(beta * dw) + 1 - sig(beta * (dw - dl))


@pairwise
def ref_discopop(case, beta=0.1, tau=0.05):
    r = beta * h_sum(case)
    # float64: exp(-r) is finite for the |r| of the random cases.
    return (1 - sig(r / tau)) * softplus(-r) + sig(r / tau) * np.exp(-r)


@pairwise
def ref_sigmoid_norm(case, beta=0.1):
    return -logsig(beta * h_mean(case))


@pairwise
def ref_sft(case):
    lw, _, _, _, nw, _ = sums(case)
    return -lw / nw


@pairwise
def ref_simpo(case, beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.0):
    lw, ll, _, _, nw, nl = sums(case)
    z = beta * lw / nw - beta * ll / nl - gamma_beta_ratio * beta
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)


@pairwise
def ref_cpo(case, beta=0.1, alpha=1.0):
    lw, ll, _, _, nw, _ = sums(case)
    return -logsig(beta * lw - beta * ll) + alpha * (-lw / nw)


@pairwise
def ref_orpo(case, lam=0.1):
    lw, ll, _, _, nw, nl = sums(case)
    mw, ml = lw / nw, ll / nl
    lor = (mw - ml) - (np.log1p(-np.exp(mw)) - np.log1p(-np.exp(ml)))
    return -mw - lam * logsig(lor)


def _gold_nll(case):
    return -(case["gold"] * case["gold_mask"]).sum(-1) / case["gold_mask"].sum(-1)


@pairwise
def ref_tpo(case, beta=0.01, alpha=1.0):
    lw, ll, _, _, _, _ = sums(case)
    return -logsig(beta * (lw - ll)) + alpha * _gold_nll(case)


@pairwise
def ref_tpo_l(case, beta=0.01, alpha=1.0, gamma=0.5):
    lw, ll, _, _, nw, nl = sums(case)
    return -logsig(beta * (lw / nw - ll / nl) - gamma) + alpha * _gold_nll(case)


@pairwise
def ref_rpo(case, beta=0.1, alpha=1.0, nll_reduction="mean"):
    lw, _, _, _, nw, _ = sums(case)
    nll = -lw / nw if nll_reduction == "mean" else -lw
    return -logsig(beta * h_sum(case)) + alpha * nll


@pairwise
def ref_gamma_rank(case, beta=0.1, gamma=1.0):
    lw, ll, rw, rl, _, _ = sums(case)
    return -logsig(beta * ((lw - ll) + gamma * (rl - rw)))


@pairwise
def ref_modpo(case, beta=0.1, weights=(0.5, 0.5)):
    w = np.asarray(weights)
    margin = (case["other_w"] - case["other_l"]) @ w[1:]
    return -logsig((beta * h_sum(case) - margin) / w[0])


@pairwise
def ref_vpo(case, beta=0.1, alpha=1.0, online=False):
    lw, _, rw, _, _, _ = sums(case)
    sign = 1.0 if online else -1.0
    return -logsig(beta * h_sum(case)) + sign * alpha * beta * (lw - rw)


@pairwise
def ref_dno(case, eta=0.1):
    target = sig(case["win_w"] - case["win_l"])
    z = eta * h_sum(case)
    return -target * logsig(z) - sig(case["win_l"] - case["win_w"]) * logsig(-z)


@pairwise
def ref_sppo(case, beta=1e-3):
    lw, ll, rw, rl, _, _ = sums(case)
    eta = 1 / beta
    return 0.5 * ((lw - rw - eta * (case["win_w"] - 0.5)) ** 2
                  + (ll - rl - eta * (case["win_l"] - 0.5)) ** 2)


@pairwise
def ref_tgdpo(case, beta=0.1, alpha=0.5):
    dw = (case["lw"] - case["rw"]) * case["mw"]
    dl = (case["ll"] - case["rl"]) * case["ml"]
    z = ((beta * (1 + alpha * case["trw"]) * dw).sum(-1)
         - (beta * (1 - alpha * case["trl"]) * dl).sum(-1))
    return -logsig(z)


def _cpl_score(x, mask, alpha, gamma):
    total = np.zeros(x.shape[0])
    for p in range(x.shape[0]):
        t = 0
        for c in range(x.shape[1]):
            if mask[p, c]:
                total[p] += gamma ** t * alpha * x[p, c]
                t += 1
    return total


@pairwise
def ref_cpl(case, alpha=0.1, lam=0.5, gamma=1.0):
    s_pos = _cpl_score(case["lw"], case["mw"], alpha, gamma)
    s_neg = _cpl_score(case["ll"], case["ml"], alpha, gamma)
    return softplus(lam * s_neg - s_pos)


@pairwise
def ref_cpl_kl(case, alpha=0.2, lam=0.75, gamma=1.0):
    s_pos = _cpl_score(case["lw"] - case["rw"], case["mw"], alpha, gamma)
    s_neg = _cpl_score(case["ll"] - case["rl"], case["ml"], alpha, gamma)
    return softplus(lam * s_neg - s_pos)


def ref_mpo(case, state=None):
    bco_loss, _ = ref_bco_pair(case, state=state)
    return 0.8 * ref_dpo(case) + 0.2 * bco_loss + 1.0 * ref_sft(case)


# ---- unpaired -------------------------------------------------------------------------------

def _unpaired_d(case):
    return ((case["l"] - case["r"]) * case["m"]).sum(-1)


def ref_kto(case, beta=0.1, lam_desirable=1.0, lam_undesirable=1.0, z0=None):
    d = _unpaired_d(case)
    real = case["valid"] > 0
    if z0 is None:
        kl = ((case["kl"] - case["klr"]) * case["klm"]).sum(-1)
        z0 = max(0.0, kl[real].mean())
    loss = np.where(case["label"], lam_desirable * (1 - sig(beta * (d - z0))),
                    lam_undesirable * (1 - sig(beta * (z0 - d))))
    return finish(loss, case)


def ref_bco(case, beta=0.1, state=None):
    r = beta * _unpaired_d(case)
    m, count = _running(r[case["valid"] > 0], state)
    loss = np.where(case["label"], -logsig(r - m), -logsig(-(r - m)))
    return finish(loss, case), {"mean": m, "count": count}


# ---- listwise -------------------------------------------------------------------------------

def _list_rewards(case, beta):
    return beta * ((case["l"] - case["r"]) * case["m"]).sum(-1)


def ref_plackett_luce(case, beta=0.1):
    s = _list_rewards(case, beta)
    out = np.zeros(s.shape[0])
    for p in range(s.shape[0]):
        items = [k for k in range(s.shape[1]) if case["item"][p, k] > 0]
        # descending score, ties by position (Python's sort is stable)
        ranked = sorted(items, key=lambda k: -case["scores"][p, k])
        vals = s[p, ranked]
        out[p] = -sum(vals[i] - np.log(np.exp(vals[i:]).sum()) for i in range(len(vals)))
    return finish(out, case)


def ref_lipo_lambda(case, beta=0.1):
    s = _list_rewards(case, beta)
    out = np.zeros(s.shape[0])
    for p in range(s.shape[0]):
        items = [k for k in range(s.shape[1]) if case["item"][p, k] > 0]
        by_s = sorted(items, key=lambda k: -s[p, k])
        tau = {k: pos + 1 for pos, k in enumerate(by_s)}
        total = 0.0
        for i in items:
            for j in items:
                psi_i, psi_j = case["scores"][p, i], case["scores"][p, j]
                if psi_i > psi_j:
                    gain = abs((2 ** psi_i - 1) - (2 ** psi_j - 1))
                    disc = abs(1 / np.log(1 + tau[i]) - 1 / np.log(1 + tau[j]))
                    total += gain * disc * np.log(sig(s[p, i] - s[p, j]))
        out[p] = -total
    return finish(out, case)


# ---- reward models --------------------------------------------------------------------------

def ref_bradley_terry(case, center_coef=0.0):
    loss = (-np.log(sig(case["rw"] - case["rl"] - case["margin"]))
            + center_coef * (case["rw"] + case["rl"]) ** 2)
    return finish(loss, case)


# ---- token-level distillation ---------------------------------------------------------------

def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_aligndistil(case, beta=0.1, beta2=10.0, temperature=1.0):
    p_dpo, p_ref = _softmax(case["zd"]), _softmax(case["zr"])
    w = beta2 * np.abs(p_dpo - p_ref).sum(-1) + 1e-3
    teacher = _softmax((case["zd"] + w[..., None] * (case["zd"] - case["zr"])) / temperature)
    student = _softmax(case["z"])
    kl = (student * (np.log(student) - np.log(teacher))).sum(-1)
    per_seq = (beta / w * kl * case["m"]).sum(-1) / case["m"].sum(-1)
    return finish(per_seq, case)


STATEFUL = ("bco_pair", "bco")


# ---- online RL: each returns (per-sequence loss, count) --------------------------------------

def _rl_finish(loss, count, case):
    return np.where(case["valid"] > 0, loss, 0.0), count


def _gae_np(rewards, values, mask, gamma, lam):
    n, c = rewards.shape
    adv = np.zeros((n, c))
    for i in range(n):
        last = 0.0
        for t in reversed(range(c)):
            if not mask[i, t]:
                continue
            v_next = values[i, t + 1] if t + 1 < c and mask[i, t + 1] else 0.0
            last = rewards[i, t] + gamma * v_next - values[i, t] + gamma * lam * last
            adv[i, t] = last
    return adv, adv + values * mask


def _ppo_np(case, token_rewards, gamma, lam, cliprange, cliprange_value, vf_coef, whiten):
    tok = case["m"] * (case["valid"] > 0)[:, None]
    adv, ret = _gae_np(token_rewards, case["oldv"], tok, gamma, lam)
    if whiten:
        sel = adv[tok > 0]
        adv = (adv - sel.mean()) / np.sqrt(sel.var(ddof=1) + 1e-8)
    ratio = np.exp(case["l"] - case["old"])
    pg = np.maximum(-ratio * adv, -np.clip(ratio, 1 - cliprange, 1 + cliprange) * adv)
    v = case["v"]
    v_clip = case["oldv"] + np.clip(v - case["oldv"], -cliprange_value, cliprange_value)
    vf = 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    loss = ((pg + vf_coef * vf) * tok).sum(-1)
    return _rl_finish(loss, tok.sum(), case)


def _last_onehot(mask):
    out = np.zeros_like(mask)
    for i, row in enumerate(mask):
        out[i, int(row.sum()) - 1] = 1.0
    return out


def ref_ppo(case, kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2,
            cliprange_value=0.2, vf_coef=0.1, whiten=True):
    d = case["old"] - case["r"]
    kl = d if kl_estimator == "k1" else np.exp(-d) - 1 + d
    rewards = -kl_coef * kl + _last_onehot(case["m"]) * case["rewards"][:, None]
    return _ppo_np(case, rewards, gamma, lam, cliprange, cliprange_value, vf_coef, whiten)


def ref_rto(case, beta1=0.05, clip=0.05, beta2=0.01, beta3=1.0, gamma=1.0, lam=0.95,
            cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, whiten=True):
    rewards = (np.clip(beta1 * case["dpo_ratio"], -clip, clip)
               - beta2 * (case["old"] - case["r"])
               + _last_onehot(case["m"]) * beta3 * case["rewards"][:, None])
    return _ppo_np(case, rewards, gamma, lam, cliprange, cliprange_value, vf_coef, whiten)


def _group_adv(rewards, case, group_size, use_std, std_eps, extra=None):
    adv = np.zeros(len(rewards))
    for start in range(0, len(rewards), group_size):
        idx = [i for i in range(start, start + group_size) if case["valid"][i] > 0]
        vals = list(rewards[idx]) + ([extra] if extra is not None else [])
        if not idx:
            continue
        mean, std = np.mean(vals), np.std(vals, ddof=1)
        for i in idx:
            adv[i] = (rewards[i] - mean) / (std + std_eps) if use_std else rewards[i] - mean
    return adv


def _group_loss(case, adv, beta, eps_low, eps_high, reduction):
    tok = case["m"] * (case["valid"] > 0)[:, None]
    ratio = np.exp(case["l"] - case["old"])
    surrogate = np.minimum(ratio * adv[:, None],
                           np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[:, None])
    d = case["l"] - case["r"]
    per_token = -(surrogate - beta * (np.exp(-d) - 1 + d))
    total = (per_token * tok).sum(-1)
    if reduction == "token":
        return _rl_finish(total, tok.sum(), case)
    norm = np.maximum(tok.sum(-1), 1) if reduction == "sequence" else tok.shape[1]
    return _rl_finish(total / norm, (case["valid"] > 0).sum(), case)


def ref_grpo(case, group_size, beta=0.04, epsilon=0.2, std_eps=1e-4):
    adv = _group_adv(case["rewards"], case, group_size, True, std_eps)
    return _group_loss(case, adv, beta, epsilon, epsilon, "sequence")


def ref_dr_grpo(case, group_size, beta=0.04, epsilon=0.2):
    adv = _group_adv(case["rewards"], case, group_size, False, 0.0)
    return _group_loss(case, adv, beta, epsilon, epsilon, "max_length")


def ref_dapo(case, group_size, epsilon=0.2, epsilon_high=None, std_eps=1e-4):
    adv = _group_adv(case["rewards"], case, group_size, True, std_eps)
    high = epsilon if epsilon_high is None else epsilon_high
    return _group_loss(case, adv, 0.0, epsilon, high, "token")


def ref_ngrpo(case, group_size, max_reward=1.0, beta=0.04, eps_high=0.24, eps_low=0.16,
              std_eps=1e-4):
    adv = _group_adv(case["rewards"], case, group_size, True, std_eps, extra=max_reward)
    return _group_loss(case, adv, beta, eps_low, eps_high, "sequence")


def ref_pref_grpo(case, group_size, beta=0.04, epsilon=0.2, std_eps=1e-4):
    wins = np.zeros(len(case["rewards"]))
    for g in range(case["win"].shape[0]):
        for i in range(group_size):
            others = [j for j in range(group_size)
                      if j != i and case["valid"][g * group_size + j] > 0]
            if others:
                wins[g * group_size + i] = np.mean([case["win"][g, i, j] for j in others])
    adv = _group_adv(wins, case, group_size, True, std_eps)
    return _group_loss(case, adv, beta, epsilon, epsilon, "sequence")


def ref_rloo(case, group_size=2, beta=0.05):
    tok = case["m"] * (case["valid"] > 0)[:, None]
    shaped = case["rewards"] - beta * ((case["old"] - case["r"]) * tok).sum(-1)
    adv = np.zeros(len(shaped))
    for start in range(0, len(shaped), group_size):
        idx = [i for i in range(start, start + group_size) if case["valid"][i] > 0]
        for i in idx:
            others = [shaped[j] for j in idx if j != i]
            adv[i] = shaped[i] - (np.mean(others) if others else 0.0)
    loss = -adv * (case["l"] * tok).sum(-1)
    return _rl_finish(loss, (case["valid"] > 0).sum(), case)


REFERENCES = {name[4:]: fn for name, fn in globals().items() if name.startswith("ref_")}
RL = ("ppo", "rto", "grpo", "dr_grpo", "dapo", "ngrpo", "pref_grpo", "rloo")

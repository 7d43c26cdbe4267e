"""Random test cases for the losses: numpy dicts (for the references) and the JAX input types.

Cases mix real and filler examples; filler examples carry garbage (finite, sometimes huge)
values and full masks, so a loss that does not ignore them exactly gets a different answer.

Shape letters: `p` pairs, `n` examples, `k` list items, `c` positions, `v` vocabulary.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import prefopt_jax.losses as losses
from prefopt_jax.losses.tokenlevel import aligndistil_terms


def _mask(rng, shape):
    """Random completion masks: a real prefix of random length >= 1, then padding."""
    length = rng.integers(1, shape[-1] + 1, size=shape[:-1])
    return (np.arange(shape[-1]) < length[..., None]).astype(np.float64)


def _logps(rng, shape, scale=1.0):
    return -rng.exponential(scale, size=shape)


def _filler(rng, valid):
    """Valid flags with at least one real and one filler example."""
    valid = valid.copy()
    valid[0], valid[-1] = 1.0, 0.0
    return valid


def pair_case(seed=0, p=8, c=5, v=6, n_other=1):
    """A pairwise batch as a dict of float64 numpy arrays."""
    rng = np.random.default_rng(seed)
    valid = _filler(rng, (rng.random(p) < 0.75).astype(np.float64))
    case = {
        "lw": _logps(rng, (p, c)), "ll": _logps(rng, (p, c)),
        "rw": _logps(rng, (p, c)), "rl": _logps(rng, (p, c)),
        "mw": _mask(rng, (p, c)), "ml": _mask(rng, (p, c)),
        "valid": valid, "weight": rng.uniform(0.5, 1.5, p),
        "gold": _logps(rng, (p, c), 0.5), "gold_mask": _mask(rng, (p, c)),
        "other_w": rng.normal(size=(p, n_other)), "other_l": rng.normal(size=(p, n_other)),
        "win_w": rng.uniform(0.3, 1.0, p), "win_l": rng.uniform(0.0, 0.7, p),
        "trw": rng.normal(size=(p, c)), "trl": rng.normal(size=(p, c)),
        "zw": rng.normal(size=(p, c, v)), "zl": rng.normal(size=(p, c, v)),
    }
    # Filler pairs: garbage everywhere, full masks.
    fill = valid == 0
    for key in ("lw", "ll", "rw", "rl"):
        case[key][fill] = -rng.uniform(0, 500, size=(fill.sum(), c))
    case["mw"][fill] = 1.0
    case["ml"][fill] = 1.0
    return case


def pair_inputs(case, ref=True, dtype=jnp.float32):
    """PairwiseInputs from a pair case (reference dropped when ref=False)."""
    a = lambda key: jnp.asarray(case[key], dtype)  # noqa: E731
    return losses.PairwiseInputs(
        logps_w_pc=a("lw"), logps_l_pc=a("ll"), mask_w_pc=a("mw"), mask_l_pc=a("ml"),
        ref_logps_w_pc=a("rw") if ref else None, ref_logps_l_pc=a("rl") if ref else None,
        valid_p=a("valid"), weight_p=a("weight"),
        token_rewards_w_pc=a("trw"), token_rewards_l_pc=a("trl"),
        logits_w_pcv=a("zw"), logits_l_pcv=a("zl"),
        extras={"gold_logps_pc": a("gold"), "gold_mask_pc": a("gold_mask"),
                "other_rewards_w_pk": a("other_w"), "other_rewards_l_pk": a("other_l"),
                "win_prob_w_p": a("win_w"), "win_prob_l_p": a("win_l")},
    )


def unpaired_case(seed=0, n=10, c=5):
    rng = np.random.default_rng(seed)
    valid = _filler(rng, (rng.random(n) < 0.8).astype(np.float64))
    label = rng.random(n) < 0.5
    label[:2] = [True, False]
    case = {"l": _logps(rng, (n, c)), "r": _logps(rng, (n, c)), "m": _mask(rng, (n, c)),
            "kl": _logps(rng, (n, c)), "klr": _logps(rng, (n, c)), "klm": _mask(rng, (n, c)),
            "label": label, "valid": valid, "weight": rng.uniform(0.5, 1.5, n)}
    fill = valid == 0
    for key in ("l", "r", "kl", "klr"):
        case[key][fill] = -rng.uniform(0, 500, size=(fill.sum(), c))
    return case


def unpaired_inputs(case, dtype=jnp.float32):
    a = lambda key: jnp.asarray(case[key], dtype)  # noqa: E731
    return losses.UnpairedInputs(
        logps_nc=a("l"), mask_nc=a("m"), label_n=jnp.asarray(case["label"]),
        ref_logps_nc=a("r"), valid_n=a("valid"), weight_n=a("weight"),
        kl_logps_nc=a("kl"), kl_ref_logps_nc=a("klr"), kl_mask_nc=a("klm"))


def list_case(seed=0, p=6, k=4, c=4):
    rng = np.random.default_rng(seed)
    item = (rng.random((p, k)) < 0.8).astype(np.float64)
    item[:, :2] = 1.0  # every list has at least two real items
    valid = _filler(rng, (rng.random(p) < 0.8).astype(np.float64))
    case = {"l": _logps(rng, (p, k, c)), "r": _logps(rng, (p, k, c)), "m": _mask(rng, (p, k, c)),
            "scores": rng.normal(size=(p, k)) * 2, "item": item, "valid": valid,
            "weight": rng.uniform(0.5, 1.5, p)}
    fill = valid == 0
    case["l"][fill] = -rng.uniform(0, 500, size=(fill.sum(), k, c))
    return case


def list_inputs(case, dtype=jnp.float32):
    a = lambda key: jnp.asarray(case[key], dtype)  # noqa: E731
    return losses.ListwiseInputs(
        logps_pkc=a("l"), mask_pkc=a("m"), scores_pk=a("scores"), ref_logps_pkc=a("r"),
        item_valid_pk=a("item"), valid_p=a("valid"), weight_p=a("weight"))


def reward_case(seed=0, p=8):
    rng = np.random.default_rng(seed)
    valid = _filler(rng, (rng.random(p) < 0.8).astype(np.float64))
    return {"rw": rng.normal(size=p) * 2, "rl": rng.normal(size=p) * 2,
            "margin": rng.uniform(0, 1, p), "valid": valid, "weight": rng.uniform(0.5, 1.5, p)}


def reward_inputs(case, dtype=jnp.float32):
    a = lambda key: jnp.asarray(case[key], dtype)  # noqa: E731
    return losses.RewardPairInputs(reward_w_p=a("rw"), reward_l_p=a("rl"), margin_p=a("margin"),
                                   valid_p=a("valid"), weight_p=a("weight"))


def distill_case(seed=0, n=5, c=4, v=7):
    rng = np.random.default_rng(seed)
    valid = _filler(rng, (rng.random(n) < 0.8).astype(np.float64))
    return {"z": rng.normal(size=(n, c, v)) * 2, "zd": rng.normal(size=(n, c, v)) * 2,
            "zr": rng.normal(size=(n, c, v)) * 2, "m": _mask(rng, (n, c)), "valid": valid,
            "weight": rng.uniform(0.5, 1.5, n)}


@flax.struct.dataclass
class LogitsDistill:
    """Full-vocabulary logits of student, teacher and reference `[N, C, V]` (tests only).

    The engine evaluates `aligndistil_terms` in its log-prob chunks; `distill_from_logits`
    does it on whole arrays, so the tests check terms and loss together against numpy.
    """

    logits_ncv: jax.Array
    dpo_logits_ncv: jax.Array
    ref_logits_ncv: jax.Array
    mask_nc: jax.Array
    valid_n: jax.Array | None = None
    weight_n: jax.Array | None = None


def distill_from_logits(inputs: LogitsDistill, state=None, *, beta=0.1, beta2=10.0,
                        temperature=1.0):
    """aligndistil on full logits: its per-token terms, then the loss."""
    terms = aligndistil_terms(inputs.logits_ncv, inputs.dpo_logits_ncv, inputs.ref_logits_ncv,
                              beta2=beta2, temperature=temperature)
    distill = losses.DistillInputs(kl_nc=terms["kl"], teacher_weight_nc=terms["teacher_weight"],
                                   mask_nc=inputs.mask_nc, valid_n=inputs.valid_n,
                                   weight_n=inputs.weight_n)
    return losses.get("aligndistil")(distill, state, beta=beta, beta2=beta2,
                                     temperature=temperature)


def distill_inputs(case, dtype=jnp.float32):
    a = lambda key: jnp.asarray(case[key], dtype)  # noqa: E731
    return LogitsDistill(logits_ncv=a("z"), dpo_logits_ncv=a("zd"), ref_logits_ncv=a("zr"),
                         mask_nc=a("m"), valid_n=a("valid"), weight_n=a("weight"))


def loss_fn(name):
    """The registered loss, or for distillation objectives their full-logits form."""
    return distill_from_logits if family(name) == "distill" else losses.get(name)


def rollout_case(seed=0, g=4, k=4, c=5):
    """Groups of k sampled completions; the last group is filler, and so is one row of group 0."""
    rng = np.random.default_rng(seed)
    n = g * k
    valid = np.ones(n)
    valid[-k:] = 0.0
    valid[1] = 0.0
    logps = _logps(rng, (n, c))
    win = rng.uniform(size=(g, k, k))
    win = np.triu(win, 1) + np.tril(1 - win.transpose(0, 2, 1), -1) + 0.5 * np.eye(k)
    case = {"l": logps, "old": logps + rng.normal(scale=0.3, size=(n, c)),
            "r": _logps(rng, (n, c)), "dpo": _logps(rng, (n, c)), "m": _mask(rng, (n, c)),
            "rewards": rng.normal(size=n), "v": rng.normal(size=(n, c)),
            "oldv": rng.normal(size=(n, c)), "valid": valid, "weight": np.ones(n),
            "win": win, "k": k}
    case["dpo_ratio"] = case["dpo"] - case["r"]  # the DPO policy against its reference
    fill = valid == 0
    case["l"][fill] = -rng.uniform(0, 50, size=(fill.sum(), c))
    return case


def rollout_inputs(case, dtype=jnp.float32):
    a = lambda key: jnp.asarray(case[key], dtype)  # noqa: E731
    return losses.RolloutInputs(
        logps_nc=a("l"), mask_nc=a("m"), rewards_n=a("rewards"), old_logps_nc=a("old"),
        ref_logps_nc=a("r"), values_nc=a("v"), old_values_nc=a("oldv"), valid_n=a("valid"),
        extras={"dpo_log_ratio_nc": a("dpo_ratio"), "win_prob_gkk": a("win")})


# Which input family each registered name takes.
UNPAIRED = ("kto", "bco")
LISTWISE = ("plackett_luce", "lipo_lambda")
REWARD = ("bradley_terry",)
DISTILL = ("aligndistil",)
ROLLOUT = ("ppo", "rto", "grpo", "dr_grpo", "dapo", "ngrpo", "pref_grpo", "rloo")
GROUPED = ("grpo", "dr_grpo", "dapo", "ngrpo", "pref_grpo", "rloo")


def text_names():
    """The registered objectives over language-model inputs; the diffusion objectives have
    their own references and cases in test_diffusion_losses.py."""
    return [n for n in losses.names() if losses.info(n).inputs not in losses.DIFFUSION_INPUTS]


def family(name):
    for fam, names in (("unpaired", UNPAIRED), ("listwise", LISTWISE), ("reward", REWARD),
                       ("distill", DISTILL), ("rollout", ROLLOUT)):
        if name in names:
            return fam
    return "pairwise"


CASES = {"pairwise": (pair_case, pair_inputs), "unpaired": (unpaired_case, unpaired_inputs),
         "listwise": (list_case, list_inputs), "reward": (reward_case, reward_inputs),
         "distill": (distill_case, distill_inputs),
         "rollout": (rollout_case, rollout_inputs)}


def default_hyper(name, case):
    """Hyperparameters a loss cannot default (the group size of the grouped RL losses)."""
    return {"group_size": case["k"]} if name in GROUPED else {}

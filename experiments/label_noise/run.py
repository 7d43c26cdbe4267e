"""Flipped preference labels: does rDPO hold where DPO degrades, and what does cDPO do?

    python experiments/label_noise/run.py [--steps 30] [--rates 0 0.1 0.2 0.3 0.4]

Two settings, the same three objectives, each told the true flip rate `e`:
DPO (`dpo`), cDPO (`dpo` with `label_smoothing = e`) and rDPO (`robust` with
`label_smoothing = e`); at `e = 0` all three are DPO.

1. The exact tabular token MDP (`tokenmdp.tabular`, vocabulary 3, horizon 3, 2 prompts,
   beta 1, seeds 0-2): each objective is minimised (L-BFGS) on the exact expected loss of the
   pair set with each label flipped with probability `e` (`tabular.flipped_pairs`). Reported:
   the distance `KL(pi* || pi)` to the KL-regularised optimum of the clean preferences, and the
   win rate against the reference under the true reward.
2. Sentiment pairs: the quickstart's run (`configs/experiments/quickstart.gin`, DPO beta 0.1 with
   LoRA, 30 steps) with `DataSpec.flip_rate = e` (a seeded share `e` of the 147 training pairs has
   chosen and rejected swapped). Reported: the implicit reward's accuracy on the 41 held-out pairs
   and on the clean labels of the 147 training pairs, and the change in mean VADER sentiment of
   greedy replies to the 41 held-out prompts over the base model.
Writes `results.json` and `label_noise.png` beside this file; runs go to `runs/label_noise/`
and a rerun reuses finished ones.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentiment_lab as lab  # noqa: E402  (experiments/ is not an installed package)

BETA_LM = 0.1
METHODS = ("DPO", "cDPO", "rDPO")


def objective(method: str, rate: float, beta: float):
    """(registry name, hyper-parameters) of a method told the flip rate."""
    if method == "rDPO":
        return "robust", {"beta": beta, "label_smoothing": rate}
    return "dpo", {"beta": beta, "label_smoothing": rate if method == "cDPO" else 0.0}


def tabular_sweep(rates, seeds, steps: int = 200) -> dict:
    """Per method and rate: mean and spread over seeds of KL(pi*||pi) and the win rate."""
    from prefopt_jax.tokenmdp import tabular

    out = {m: {str(r): {"kl_to_optimum": [], "win_rate": []} for r in rates} for m in METHODS}
    for seed in seeds:
        mdp = tabular.random_mdp(3, 3, 2, beta=1.0, reward_scale=1.0, ref_scale=0.5, seed=seed)
        pairs = tabular.all_pairs(mdp)
        star_ps = tabular.optimal_sequence_logps(mdp)
        ref_ps = tabular.sequence_logps(mdp.ref_logits_pnv, mdp.tree)
        rewards_ps = tabular.sequence_rewards(mdp)
        for rate in rates:
            noisy = tabular.flipped_pairs(pairs, rate)
            for method in METHODS:
                loss, hyper = objective(method, rate, 1.0)
                fit = tabular.fit(mdp, loss, noisy, hyper=hyper, steps=steps,
                                  optimizer="lbfgs", learning_rate=0.1)
                seq_ps = tabular.sequence_logps(fit.logits_pnv, mdp.tree)
                cell = out[method][str(rate)]
                cell["kl_to_optimum"].append(tabular.kl(star_ps, seq_ps))
                cell["win_rate"].append(tabular.win_rate(seq_ps, ref_ps, rewards_ps))
        print(f"tabular seed {seed} done", flush=True)
    return out


def run_name(method: str, rate: float) -> str:
    return f"dpo_{rate:g}" if rate == 0 else f"{method.lower()}_{rate:g}"


def train_args(method: str, rate: float) -> list[str]:
    loss, hyper = objective(method, rate, BETA_LM)
    args = [f"--gin.DataSpec.flip_rate={rate}"]
    if loss == "robust":
        args.append("configs/algos/robust.gin")
    return args + [f"--gin.AlgoConfig.hyper={{'{loss}': {hyper!r}}}"]


def sentiment_sweep(rates, steps: int, runs: str, wall: dict) -> dict:
    """Per method and rate: held-out and clean-train implicit-reward accuracy, greedy gain."""
    cells = [(m, r) for r in rates for m in METHODS if r > 0 or m == "DPO"]
    for method, rate in cells:
        seconds = lab.train(f"{runs}/{run_name(method, rate)}", *train_args(method, rate),
                            f"--gin.LoopConfig.steps={steps}")
        if seconds is not None:
            wall[run_name(method, rate)] = round(seconds, 1)
    base, tokenizer = lab.load_base()
    prompts = lab.prompt_ids(tokenizer, lab.read_prompts())
    base_greedy = lab.greedy_sentiment(base, tokenizer, prompts)
    out = {"base_greedy_sentiment": float(base_greedy.mean())}
    t = time.time()
    for method, rate in cells:
        policy = lab.load_policy(f"{runs}/{run_name(method, rate)}")
        held = lab.pair_metrics(policy, base, tokenizer, BETA_LM)
        clean = lab.pair_metrics(policy, base, tokenizer, BETA_LM, path=lab.TRAIN)
        greedy = lab.greedy_sentiment(policy, tokenizer, prompts)
        gain, gain_se = lab.mean_se(greedy - base_greedy)
        cell = {"heldout_accuracy": held["implicit_reward_accuracy"],
                "heldout_pairs": held["pairs"],
                "train_clean_accuracy": clean["implicit_reward_accuracy"],
                "train_pairs": clean["pairs"],
                "greedy_sentiment": float(greedy.mean()), "gain": gain, "gain_se": gain_se}
        out.setdefault(method, {})[str(rate)] = cell
        print(method, rate, {k: round(v, 3) for k, v in cell.items()}, flush=True)
    for method in ("cDPO", "rDPO"):  # at rate 0 both are DPO
        if "0.0" in out["DPO"]:
            out[method] = {"0.0": out["DPO"]["0.0"], **out[method]}
    wall["evaluation"] = round(time.time() - t, 1)
    return out


def plot(tab: dict, lm: dict, rates, path: str) -> None:
    fig, axes = lab.subplots(1, 3, figsize=(14, 3.8))
    for i, (method, marker) in enumerate(zip(METHODS, "osd")):
        style = {"marker": marker, "color": f"C{i}"}
        kl = [np.mean(tab[method][str(r)]["kl_to_optimum"]) for r in rates]
        axes[0].plot(rates, np.maximum(kl, 1e-12), label=method, **style)
        axes[1].plot(rates, [lm[method][str(r)]["heldout_accuracy"] for r in rates],
                     label=f"{method} held-out", **style)
        axes[1].plot(rates, [lm[method][str(r)]["train_clean_accuracy"] for r in rates],
                     ls=":", label=f"{method} train, clean labels", **style)
        axes[2].errorbar(rates, [lm[method][str(r)]["gain"] for r in rates],
                         yerr=[lm[method][str(r)]["gain_se"] for r in rates], capsize=3,
                         label=method, **style)
    axes[0].set(yscale="log", xlabel="flip rate", ylabel="KL(pi* || pi) (floor 1e-12)",
                title="tabular MDP: distance to pi*")
    axes[1].set(xlabel="flip rate", ylabel="implicit-reward accuracy",
                title="sentiment pairs: reward accuracy")
    axes[1].axhline(0.5, color="grey", lw=0.8)
    axes[2].set(xlabel="flip rate", ylabel="greedy sentiment - base",
                title="sentiment pairs: sentiment gain")
    axes[2].axhline(0.0, color="grey", lw=0.8)
    lab.save_figure(fig, path)


def main() -> None:
    p = lab.parser(__doc__)
    p.add_argument("--rates", type=float, nargs="*", default=[0.0, 0.1, 0.2, 0.3, 0.4])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--runs", default="runs/label_noise", help="output directories' parent")
    args = p.parse_args()
    wall = {}
    t = time.time()
    tab = tabular_sweep(args.rates, args.seeds)
    wall["tabular"] = round(time.time() - t, 1)
    lm = sentiment_sweep(args.rates, args.steps, args.runs, wall)
    lab.write_json(os.path.join(HERE, "results.json"),
                   {"tabular": tab, "sentiment": lm, "rates": args.rates, "seeds": args.seeds,
                    "steps": args.steps, "wall_seconds": wall})
    plot(tab, lm, args.rates, os.path.join(HERE, "label_noise.png"))
    print("| flip rate | " + " | ".join(f"{m} KL(pi*‖pi)" for m in METHODS) + " | "
          + " | ".join(f"{m} held-out acc / clean-train acc / gain" for m in METHODS) + " |")
    print("|---" * (1 + 2 * len(METHODS)) + "|")
    for r in args.rates:
        kl = [f"{np.mean(tab[m][str(r)]['kl_to_optimum']):.3g}" for m in METHODS]
        cells = [lm[m][str(r)] for m in METHODS]
        acc = [f"{c['heldout_accuracy']:.3f} / {c['train_clean_accuracy']:.3f} / "
               f"{c['gain']:+.3f}" for c in cells]
        print(f"| {r:g} | " + " | ".join(kl) + " | " + " | ".join(acc) + " |")
    print("wall seconds", wall)


if __name__ == "__main__":
    main()

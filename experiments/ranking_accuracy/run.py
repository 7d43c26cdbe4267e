"""Does DPO learn the preference ranking? Ranking accuracy along training against the idealised one.

    python experiments/ranking_accuracy/run.py [--steps 30] [--every 5]

"Preference Learning Algorithms Do Not Learn Preference Rankings" (Chen et al., 2024): the
ranking accuracy of a policy, the share of pairs with `pi(y_w|x) > pi(y_l|x)`, stays near the
reference model's, far below the idealised ranking accuracy that a perfectly optimised DPO
policy would reach, `R* = E 1[log pi_ref(y_w)/pi_ref(y_l) + (1/b) log(alpha/(1-alpha)) > 0]` for
raters who prefer `y_w` with probability `alpha`; and DPO rarely flips a pair the reference ranks
wrong: that needs the pair's DPO loss below `-log s(b c)`, `c = log pi_ref(y_l)/pi_ref(y_w)` (the
pair's difficulty), which is hard to reach when `c` is large.

Here: the quickstart's run (`configs/experiments/quickstart.gin`: DPO beta 0.1, LoRA, 30 steps,
batch 4, lr 1e-3) is trained in stages of `--every` steps in one run directory (each stage
resumes the previous one exactly; `OptimConfig.total_steps` keeps the 30-step cosine schedule),
and after every stage the exported policy is measured on the 147 training and 41 held-out pairs:
ranking accuracy (summed and length-normalised log-probs), implicit-reward accuracy, and the
idealised ranking accuracy for `alpha` 0.6, 0.75, 0.9 and 0.99 (VADER is one deterministic rater,
so `alpha` is not observed). At the end, the training pairs the reference ranks wrong are split
by difficulty `c`: how many DPO fixed, and how many reached the loss threshold.
Writes `results.json` and `ranking_accuracy.png` beside this file; the run goes to
`runs/ranking_accuracy/`.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentiment_lab as lab  # noqa: E402  (experiments/ is not an installed package)

BETA = 0.1
ALPHAS = (0.6, 0.75, 0.9, 0.99)
SETS = {"train": lab.TRAIN, "heldout": lab.HELDOUT}


def pair_logps(model, data) -> dict:
    from prefopt_jax.evals import policy_eval

    l_w, l_l, n_w, n_l = policy_eval.sequence_logps(model, data)
    return {"w": l_w, "l": l_l, "n_w": n_w, "n_l": n_l}


def dpo_loss_p(pol: dict, ref: dict) -> np.ndarray:
    """Each pair's DPO loss `-log s(b [(L_w - L_w^ref) - (L_l - L_l^ref)])`."""
    return np.logaddexp(0.0, -BETA * ((pol["w"] - ref["w"]) - (pol["l"] - ref["l"])))


def measures(pol: dict, ref: dict) -> dict:
    """The figures of one policy on one pair set (ties count as wrong)."""
    from prefopt_jax.evals import metrics

    out = {"ranking_accuracy": float(np.mean(pol["w"] > pol["l"])),
           "ranking_accuracy_length_normalised": float(np.mean(
               pol["w"] / pol["n_w"] > pol["l"] / pol["n_l"])),
           "implicit_reward_accuracy": metrics.implicit_reward_accuracy(
               pol["w"], ref["w"], pol["l"], ref["l"], BETA),
           "mean_dpo_loss": float(np.mean(dpo_loss_p(pol, ref)))}
    for alpha in ALPHAS:
        out[f"idealised_alpha_{alpha:g}"] = metrics.idealised_ranking_accuracy(
            ref["w"], ref["l"], np.full(len(ref["w"]), alpha), BETA)
    return out


def difficulty_table(pol: dict, ref: dict, edges=(0.0, 2.0, 5.0, 10.0, np.inf)) -> list[dict]:
    """Training pairs the reference ranks wrong, binned by difficulty `c`: how many the policy
    ranks right, and how many reached the DPO loss that flipping needs."""
    from prefopt_jax.evals import metrics

    c_p = ref["l"] - ref["w"]
    below_p = dpo_loss_p(pol, ref) <= metrics.flip_threshold(ref["w"], ref["l"], BETA)
    fixed_p = pol["w"] > pol["l"]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (c_p > lo) & (c_p <= hi)
        rows.append({"c_from": lo, "c_to": hi, "pairs": int(in_bin.sum()),
                     "fixed": int((fixed_p & in_bin).sum()),
                     "loss_below_threshold": int((below_p & in_bin).sum()),
                     "threshold_mean": float(np.mean(metrics.flip_threshold(
                         ref["w"][in_bin], ref["l"][in_bin], BETA))) if in_bin.any() else None})
    return rows


def plot(curve: dict, path: str) -> None:
    fig, axes = lab.subplots(1, 2, figsize=(12, 4))
    for ax, name in zip(axes, SETS):
        steps = [c["step"] for c in curve[name]]
        for key, style in (("ranking_accuracy", "o-"), ("ranking_accuracy_length_normalised",
                                                         "s-"),
                           ("implicit_reward_accuracy", "d-")):
            ax.plot(steps, [c[key] for c in curve[name]], style, label=key.replace("_", " "))
        for alpha, ls in zip(ALPHAS, (":", "-.", "--", (0, (1, 3)))):
            ax.plot(steps, [c[f"idealised_alpha_{alpha:g}"] for c in curve[name]], color="k",
                    ls=ls, lw=1, label=f"idealised, alpha {alpha:g}")
        ax.set(xlabel="DPO step", ylabel="share of pairs", ylim=(0, 1.02),
               title=f"{name} pairs ({curve[name][0]['pairs']})")
    lab.save_figure(fig, path, [axes[0]], loc="lower right")


def main() -> None:
    p = lab.parser(__doc__)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--run", default="runs/ranking_accuracy/dpo", help="the run directory")
    args = p.parse_args()
    from prefopt_jax.evals import policy_eval

    base, tokenizer = lab.load_base()
    data = {name: policy_eval.load_pairs(os.path.join(lab.ROOT, path), tokenizer, 64)
            for name, path in SETS.items()}
    ref = {name: pair_logps(base, d) for name, d in data.items()}
    curve = {name: [dict(step=0, pairs=len(ref[name]["w"]), **measures(ref[name], ref[name]))]
             for name in SETS}
    wall = {"train": 0.0, "evaluation": 0.0}
    for stage, seconds in lab.train_in_stages(args.run, args.steps, args.every):
        wall["train"] += seconds
        t = time.time()
        policy = lab.load_policy(args.run)
        pol = {name: pair_logps(policy, d) for name, d in data.items()}
        for name in SETS:
            curve[name].append(dict(step=stage, pairs=len(pol[name]["w"]),
                                    **measures(pol[name], ref[name])))
            print(stage, name, {k: round(v, 3) for k, v in curve[name][-1].items()}, flush=True)
        wall["evaluation"] += time.time() - t
    table = difficulty_table(pol["train"], ref["train"])
    lab.write_json(os.path.join(HERE, "results.json"),
                   {"curve": curve, "difficulty_train": table, "beta": BETA,
                    "steps": args.steps, "every": args.every,
                    "wall_seconds": {k: round(v, 1) for k, v in wall.items()}})
    plot(curve, os.path.join(HERE, "ranking_accuracy.png"))
    for name in SETS:
        first, last = curve[name][0], curve[name][-1]
        print(f"## {name}: step 0 -> {last['step']}")
        for key in first:
            if key not in ("step", "pairs"):
                print(f"| {key} | {first[key]:.3f} | {last[key]:.3f} |")
    print("| difficulty c | pairs ranked wrong by the reference | fixed by DPO | "
          "loss below the threshold |")
    for row in table:
        print(f"| ({row['c_from']:g}, {row['c_to']:g}] | {row['pairs']} | {row['fixed']} | "
              f"{row['loss_below_threshold']} |")
    print("wall seconds", wall)


if __name__ == "__main__":
    main()

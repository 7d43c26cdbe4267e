"""Do the chosen replies' implicit rewards fall during DPO, and does the reference decide it?

    python experiments/implicit_reward_decline/run.py [--steps 30] [--every 10]

"From r to Q*" (Rafailov et al., 2024) explains a common sight in DPO training, the implicit reward
`b log pi(y_w)/pi_ref(y_w)` of the chosen replies going down while the margin over the rejected
ones goes up: when the reference is the SFT model fitted to the chosen replies, the expected
chosen reward is `-b KL(p_w || pi) <= 0` at any policy (it starts at 0 and can only go down).
With a reference that was not fitted to the chosen replies there is no such bound.

Here, on the real model with the quickstart's data (147 on-policy SmolLM2 pairs ranked by VADER,
DPO beta 0.1 with LoRA, lr 1e-3, batch 4, `configs/experiments/quickstart.gin`):
- `base_ref`: DPO from SmolLM2-135M-Instruct with itself as the reference (the quickstart);
- `sft_ref`: SFT on the chosen replies first (`configs/algos/sft.gin`, the same LoRA set-up and
  `--sft-steps` steps), then DPO from the SFT model with the SFT model as the reference.
Both DPO runs train in stages of `--every` steps (each resumes the previous one exactly; the
schedule is that of one run). After each stage, the mean implicit rewards of the chosen and the
rejected replies over all 147 training pairs and the 41 held-out pairs, and the log-probability
of the chosen replies, are measured against that run's reference. The tabular counterpart, with
the exact `-b KL` identity, is `experiments/tabular_qstar/`.
Writes `results.json` and `implicit_rewards.png` beside this file; runs go to
`runs/implicit_reward_decline/`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentiment_lab as lab  # noqa: E402  (experiments/ is not an installed package)

BETA = 0.1
SETS = {"train": lab.TRAIN, "heldout": lab.HELDOUT}


def rewards(policy, ref_logps: dict, data: dict) -> dict:
    """Mean chosen and rejected implicit rewards (and the margin, the chosen log-prob per
    token) of `policy` against the reference log-probs, per pair set."""
    from prefopt_jax.evals import policy_eval

    out = {}
    for name, d in data.items():
        l_w, l_l, n_w, _ = policy_eval.sequence_logps(policy, d)
        r_w, r_l = BETA * (l_w - ref_logps[name][0]), BETA * (l_l - ref_logps[name][1])
        out[name] = {"chosen": float(r_w.mean()), "rejected": float(r_l.mean()),
                     "margin": float((r_w - r_l).mean()),
                     "chosen_logp_per_token": float((l_w / n_w).mean()),
                     "chosen_reward_falls_share": float(np.mean(r_w < 0))}
    return out


def plot(curves: dict, path: str) -> None:
    fig, axes = lab.subplots(1, 3, figsize=(14, 3.8))
    for i, (run, curve) in enumerate(curves.items()):
        steps = [c["step"] for c in curve]
        for ax, name in zip(axes[:2], SETS):
            ax.plot(steps, [c[name]["chosen"] for c in curve], "o-", color=f"C{i}",
                    label=f"{run}: chosen")
            ax.plot(steps, [c[name]["rejected"] for c in curve], "s--", color=f"C{i}",
                    label=f"{run}: rejected")
            ax.set(xlabel="DPO step", ylabel="mean implicit reward b log pi/pi_ref",
                   title=f"{name} pairs")
        axes[2].plot(steps, [c["train"]["chosen_logp_per_token"] for c in curve], "o-",
                     color=f"C{i}", label=run)
    axes[2].set(xlabel="DPO step", ylabel="log pi(y_w) per token",
                title="chosen replies' log-prob (train)")
    for ax in axes[:2]:
        ax.axhline(0.0, color="grey", lw=0.8)
    lab.save_figure(fig, path)


def main() -> None:
    p = lab.parser(__doc__)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--runs", default="runs/implicit_reward_decline")
    args = p.parse_args()
    from prefopt_jax.evals import policy_eval

    wall = {}
    sft = f"{args.runs}/sft"
    seconds = lab.train(sft, "configs/algos/sft.gin", f"--gin.LoopConfig.steps={args.sft_steps}")
    if seconds is not None:
        wall["sft"] = round(seconds, 1)
    base, tokenizer = lab.load_base()
    # run -> (its reference, the gin arguments that start DPO from it)
    starts = {"base_ref": (base, []),
              "sft_ref": (lab.load_policy(sft),
                          [f"--gin.ModelSpec.source='{os.path.join(lab.ROOT, sft, 'export')}'"])}
    data = {name: policy_eval.load_pairs(os.path.join(lab.ROOT, path), tokenizer, 64)
            for name, path in SETS.items()}
    curves = {}
    for run, (reference, gin_args) in starts.items():
        ref_logps = {name: policy_eval.sequence_logps(reference, d)[:2]
                     for name, d in data.items()}
        curves[run] = [{"step": 0, **rewards(reference, ref_logps, data)}]
        wall[run] = 0.0
        for stage, seconds in lab.train_in_stages(f"{args.runs}/{run}", args.steps, args.every,
                                                  *gin_args):
            wall[run] += round(seconds, 1)
            curves[run].append({"step": stage, **rewards(lab.load_policy(f"{args.runs}/{run}"),
                                                         ref_logps, data)})
            print(run, curves[run][-1], flush=True)
    lab.write_json(os.path.join(HERE, "results.json"),
                   {"curves": curves, "beta": BETA, "steps": args.steps,
                    "sft_steps": args.sft_steps, "wall_seconds": wall})
    plot(curves, os.path.join(HERE, "implicit_rewards.png"))
    print("| reference | pairs | step | chosen | rejected | margin | log pi(y_w)/token |")
    print("|---|---|---|---|---|---|---|")
    for run, curve in curves.items():
        for name in SETS:
            for c in (curve[0], curve[-1]):
                r = c[name]
                print(f"| {run} | {name} | {c['step']} | {r['chosen']:+.3f} | "
                      f"{r['rejected']:+.3f} | {r['margin']:+.3f} | "
                      f"{r['chosen_logp_per_token']:.3f} |")
    print("wall seconds", wall)


if __name__ == "__main__":
    main()

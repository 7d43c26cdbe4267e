"""PPO on the sparse VADER reward against RTO with a DPO policy's dense token rewards.

    python experiments/rto_sentiment/run.py [--dpo DIR] [--steps 24]

Ground truth: VADER's compound sentiment of a reply. Three policies from SmolLM2-135M-Instruct:
- `dpo`: the quickstart's DPO policy (`--dpo`, default `runs/quickstart/export`; trained with
  `configs/experiments/quickstart.gin` first when missing);
- `ppo`: PPO with a critic on the sparse final reward (VADER), from
  `configs/experiments/rto_sentiment.gin`;
- `rto`: the same loop with `configs/algos/rto.gin`: the DPO policy's token rewards
  `b log pi_dpo(y_t|s_t)/pi_ref(y_t|s_t)` (b = 0.1, the DPO beta) and no sparse reward
  (VADER is logged but weighted 0), with the same KL weight as PPO.
Each trains on the quickstart's training prompts (`prefopt train`, one process per method,
resumable). Then every policy and the base model sample 2 replies to each held-out prompt
(temperature 1, 48 tokens): mean VADER sentiment and the sampled KL to the base model.
Writes `results.json` and `curves.png` (training sentiment per iteration and against the
sampled KL) beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentiment_lab as lab  # noqa: E402  (experiments/ is not an installed package)

CONFIG = "configs/experiments/rto_sentiment.gin"
RTO = ["configs/algos/rto.gin",
       "--gin.AlgoConfig.hyper={'rto': {'beta1': 0.1, 'clip': 0.5, 'beta2': 0.05, "
       "'beta3': 0.0}}",
       "--gin.RLConfig.reward_weights=[0.0]"]
SAMPLES_PER_ITERATION = 16  # 8 prompts x 2


def evaluate(source: str, base, tokenizer, prompts: list, seed: int = 0) -> dict:
    """Mean VADER sentiment of 2 sampled replies per prompt, and their KL to the base model."""
    policy = base if source == "base" else lab.load_policy(source)
    return lab.evaluate(policy, base, tokenizer, prompts, samples=2, seed=seed)


def first_reaching(curve: list[float], level: float) -> int | None:
    """The first iteration whose training sentiment reaches `level` (None: never)."""
    return next((i for i, x in enumerate(curve) if x >= level), None)


def plot(runs: dict, held: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, recs in runs.items():
        first = [r for r in recs if r["step"] == 1 or r["iteration"] != recs[recs.index(r) - 1]
                 ["iteration"]]
        axes[0].plot([r["iteration"] for r in first], [r["reward/sentiment"] for r in first],
                     label=method, marker=".")
        axes[1].plot([r["kl/sequence"] for r in first], [r["reward/sentiment"] for r in first],
                     label=f"{method} (training samples)", marker=".")
    for name, res in held.items():
        axes[1].scatter([res["kl"]], [res["sentiment"]], marker="x", s=60,
                        label=f"{name} (held-out)")
    axes[0].set(xlabel="iteration (16 samples each)", ylabel="mean VADER sentiment",
                title="sentiment of the sampled replies")
    axes[1].set(xlabel="sampled KL to the base model (nats per reply)",
                ylabel="mean VADER sentiment", title="sentiment against KL")
    axes[0].legend()
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dpo", default="runs/quickstart/export", help="the DPO policy's export")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--runs", default="runs/rto_sentiment", help="output directories' parent")
    p.add_argument("--level", type=float, default=0.6, help="the sentiment level to reach")
    args = p.parse_args()
    wall = {}
    if not os.path.isdir(os.path.join(lab.ROOT, args.dpo)):
        wall["dpo"] = lab.prefopt("train", "configs/experiments/quickstart.gin")
    for method in ("ppo", "rto"):
        out = f"{args.runs}/{method}"
        extra = RTO + [f"--gin.TEACHER='{args.dpo}'"] if method == "rto" else []
        wall[method] = lab.prefopt("train", CONFIG, *extra,
                                   f"--gin.LoopConfig.output_dir='{out}'",
                                   f"--gin.LoopConfig.steps={args.steps}")
    runs = {m: lab.read_metrics(f"{args.runs}/{m}") for m in ("ppo", "rto")}

    base, tokenizer = lab.load_base()
    prompts = lab.prompt_ids(tokenizer, lab.read_prompts())
    t = time.time()
    held = {name: evaluate(source, base, tokenizer, prompts)
            for name, source in (("base", "base"), ("dpo", args.dpo),
                                 ("ppo", f"{args.runs}/ppo/export"),
                                 ("rto", f"{args.runs}/rto/export"))}
    wall["evaluation"] = time.time() - t
    curves = {m: [r["reward/sentiment"] for r in recs if r["step"] % 2 == 1]
              for m, recs in runs.items()}
    reach = {m: first_reaching(c, args.level) for m, c in curves.items()}
    results = {
        "heldout": held, "training_sentiment_per_iteration": curves,
        "training_kl_per_iteration": {m: [r["kl/sequence"] for r in recs if r["step"] % 2 == 1]
                                      for m, recs in runs.items()},
        "level": args.level,
        "samples_to_reach_level": {m: None if i is None else (i + 1) * SAMPLES_PER_ITERATION
                                   for m, i in reach.items()},
        "wall_seconds": wall, "steps": args.steps, "dpo_policy": args.dpo}
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(runs, held, os.path.join(HERE, "curves.png"))
    print(f"{'policy':8s} {'held-out sentiment':>18s} {'KL to base':>11s} {'length':>7s}")
    for name, res in held.items():
        print(f"{name:8s} {res['sentiment']:18.3f} {res['kl']:11.2f} "
              f"{res['length']:7.1f}")
    print("samples to reach training sentiment", args.level, results["samples_to_reach_level"])
    print("wall seconds", {k: round(v) for k, v in wall.items()})


if __name__ == "__main__":
    main()

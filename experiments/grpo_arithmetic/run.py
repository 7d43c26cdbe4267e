"""GRPO, Dr. GRPO, RLOO and NGRPO on arithmetic word problems at equal rollouts.

    python experiments/grpo_arithmetic/make_data.py     # once
    python experiments/grpo_arithmetic/run.py [--methods grpo,dr_grpo,rloo,ngrpo] [--steps 30]

Each method trains SmolLM2-135M-Instruct with LoRA from configs/experiments/grpo_arithmetic.gin
and its configs/algos file (`prefopt train`, one process per method, resumable) on the same
prompts, rollouts per iteration and iterations. Then the held-out problems are answered greedily
by the base model and by each trained policy, checked by math-verify (`math_answer`). Writes
`results.json` (accuracies, final rewards, lengths, wall times) and `curves.png` (training reward
and completion length per iteration) beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CONFIG = "configs/experiments/grpo_arithmetic.gin"


def train(method: str, out: str, steps: int) -> float:
    """`prefopt train` for one method; its wall time in seconds."""
    t = time.time()
    subprocess.run([sys.executable, "-m", "prefopt_jax.cli", "train", CONFIG,
                    f"configs/algos/{method}.gin", f"--gin.LoopConfig.output_dir='{out}'",
                    f"--gin.LoopConfig.steps={steps}"], cwd=ROOT, check=True)
    return time.time() - t


def heldout_accuracy(source: str, rows: list[dict], max_new_tokens: int) -> tuple[float, list]:
    """Greedy replies to the held-out problems and the share math-verify accepts."""
    from prefopt_jax.models.spec import ModelSpec, load_model
    from prefopt_jax.rewards.functions import math_answer
    from prefopt_jax.sampling.generate import SamplingConfig, generate
    from prefopt_jax.sampling.onpolicy import prompt_ids

    model, tokenizer = load_model(ModelSpec(source=source))
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_ids=(int(tokenizer.eos_token_id),))
    out = generate(model, ids, config, pad_id=int(tokenizer.pad_token_id or 0))
    replies = [tokenizer.decode(t[:n], skip_special_tokens=True)
               for t, n in zip(out.tokens_bn, out.lengths_b)]
    right = math_answer(None, replies, answer=[r["answer"] for r in rows])
    return sum(right) / len(right), replies


def curves(runs: dict, path: str) -> None:
    """Training reward and completion length per iteration, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, records in runs.items():
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["reward/mean"] for r in records], label=method)
        axes[1].plot(steps, [r["completion/length_mean"] for r in records], label=method)
    axes[0].set(xlabel="iteration", ylabel="mean reward (math-verify)", title="training reward")
    axes[1].set(xlabel="iteration", ylabel="tokens", title="completion length")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="grpo,dr_grpo,rloo,ngrpo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--runs", default="runs/grpo_arithmetic", help="output directories' parent")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    with open(os.path.join(HERE, "data", "heldout.jsonl")) as f:
        heldout = [json.loads(line) for line in f]
    results = {"steps": args.steps, "heldout_problems": len(heldout), "methods": {}}
    t = time.time()
    base, _ = heldout_accuracy("smollm2-135m-instruct", heldout, args.max_new_tokens)
    results["base_heldout_accuracy"] = base
    print(f"base model: held-out accuracy {base:.3f} ({time.time() - t:.0f} s)", flush=True)
    runs = {}
    for method in args.methods.split(","):
        out = os.path.join(ROOT, args.runs, method)
        seconds = train(method, out, args.steps)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[method] = [json.loads(line) for line in f]
        acc, replies = heldout_accuracy(os.path.join(out, "export"), heldout,
                                        args.max_new_tokens)
        last = runs[method][-5:]
        results["methods"][method] = {
            "heldout_accuracy": acc, "train_seconds": round(seconds),
            "reward_first5": sum(r["reward/mean"] for r in runs[method][:5]) / 5,
            "reward_last5": sum(r["reward/mean"] for r in last) / len(last),
            "length_last5": sum(r["completion/length_mean"] for r in last) / len(last),
            "kl_last": runs[method][-1].get("kl"), "example_reply": replies[0]}
        print(f"{method}: held-out accuracy {acc:.3f}", flush=True)
        with open(os.path.join(HERE, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        curves(runs, os.path.join(HERE, "curves.png"))
    print(table(results), flush=True)


def table(results: dict) -> str:
    """The README's result table (markdown) from results.json's content."""
    lines = ["| objective | held-out accuracy | train reward, first 5 -> last 5 iterations | "
             "reply tokens (last 5) | KL at the end | train wall time |",
             "|---|---|---|---|---|---|",
             f"| base model | {results['base_heldout_accuracy']:.3f} | | | | |"]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {r['heldout_accuracy']:.3f} | {r['reward_first5']:.3f} -> "
                     f"{r['reward_last5']:.3f} | {r['length_last5']:.1f} | {r['kl_last']:.4f} | "
                     f"{r['train_seconds']} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

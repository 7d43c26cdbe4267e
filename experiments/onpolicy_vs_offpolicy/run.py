"""On-policy against off-policy pairs: which buys more sentiment per nat of KL under DPO?

    python experiments/onpolicy_vs_offpolicy/run.py [--betas 0.03 0.1 0.3] [--steps 30]

The same 147 training prompts, two sources of pairs, both ranked by VADER with the same rule:
- on-policy: the quickstart's pairs, two replies SmolLM2-135M-Instruct sampled itself
  (`experiments/quickstart/data/train.jsonl`);
- off-policy: two replies from a templated writer (`make_data.py` here, committed in `data/`),
  fluent text that SmolLM2 would not write.
DPO with LoRA (`configs/experiments/quickstart.gin`: 30 steps, batch 4, lr 1e-3) at each beta on
each source; the on-policy runs are the frontier study's (`runs/frontier/dpo_b*`, trained here when
missing). Each policy samples 4 replies to each of the 41 held-out prompts (temperature 1): mean
VADER sentiment and sampled KL to the base model. "At matched KL": the on-policy curve
(sentiment against KL, piecewise linear between its betas) is read at each off-policy point's KL.
Writes `results.json` and `onpolicy_vs_offpolicy.png` beside this file.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentiment_lab as lab  # noqa: E402  (experiments/ is not an installed package)

OFF_POLICY = "experiments/onpolicy_vs_offpolicy/data/train.jsonl"


def run_dir(source: str, beta: float) -> str:
    return f"runs/frontier/dpo_b{beta:g}" if source == "on" else f"runs/offpolicy/dpo_b{beta:g}"


def dpo_args(beta: float) -> list[str]:
    return [f"--gin.AlgoConfig.hyper={{'dpo': {{'beta': {beta}, 'label_smoothing': 0.0}}}}"]


def at_matched_kl(on: list[dict], kl: float) -> float | None:
    """The on-policy curve's sentiment at `kl` (linear between its points; None outside)."""
    pts = sorted((r["kl"], r["sentiment"]) for r in on)
    xs, ys = zip(*pts)
    if not xs[0] <= kl <= xs[-1]:
        return None
    return float(np.interp(kl, xs, ys))


def plot(results: dict, base: dict, path: str) -> None:
    fig, ax = lab.subplots(figsize=(7.5, 4.5))
    for source, marker in (("on", "o"), ("off", "s")):
        rows = sorted(results[source], key=lambda r: r["kl"])
        ax.errorbar([r["kl"] for r in rows], [r["sentiment"] for r in rows],
                    xerr=[r["kl_se"] for r in rows], yerr=[r["sentiment_se"] for r in rows],
                    marker=marker, capsize=3, label=f"{source}-policy pairs")
        for r in rows:
            ax.annotate(f"b={r['beta']:g}", (r["kl"], r["sentiment"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.scatter([0], [base["sentiment"]], marker="*", s=120, color="k", label="base model")
    ax.set(xlabel="sampled KL(policy || base) per reply (nats)",
           ylabel="mean VADER sentiment of sampled replies",
           title="DPO on on-policy vs off-policy pairs, 41 held-out prompts")
    lab.save_figure(fig, path, fontsize=8)


def main() -> None:
    p = lab.parser(__doc__)
    p.add_argument("--betas", type=float, nargs="*", default=[0.03, 0.1, 0.3])
    p.add_argument("--samples", type=int, default=4)
    args = p.parse_args()
    wall = {}
    for beta in args.betas:
        for source in ("on", "off"):
            extra = [] if source == "on" else [f"--gin.DataSpec.source='{OFF_POLICY}'"]
            seconds = lab.train(run_dir(source, beta), *dpo_args(beta), *extra,
                                f"--gin.LoopConfig.steps={args.steps}")
            if seconds is not None:
                wall[run_dir(source, beta)] = round(seconds, 1)
    base_model, tokenizer = lab.load_base()
    prompts = lab.prompt_ids(tokenizer, lab.read_prompts())
    t = time.time()
    base = lab.evaluate(base_model, base_model, tokenizer, prompts, args.samples)
    results = {"on": [], "off": []}
    for beta in args.betas:
        for source in ("on", "off"):
            policy = lab.load_policy(run_dir(source, beta))
            res = lab.evaluate(policy, base_model, tokenizer, prompts, args.samples)
            res.update(beta=beta, run=run_dir(source, beta),
                       final_train_metrics=lab.read_metrics(run_dir(source, beta))[-1])
            results[source].append(res)
            print(source, beta, {k: round(v, 3) for k, v in res.items()
                                 if isinstance(v, float)}, flush=True)
    wall["evaluation"] = round(time.time() - t, 1)
    for r in results["off"]:
        matched = at_matched_kl(results["on"], r["kl"])
        r["on_policy_sentiment_at_this_kl"] = matched
        r["sentiment_minus_on_policy"] = None if matched is None else r["sentiment"] - matched
    lab.write_json(os.path.join(HERE, "results.json"),
                   {"base": base, "results": results, "steps": args.steps,
                    "samples_per_prompt": args.samples, "wall_seconds": wall})
    plot(results, base, os.path.join(HERE, "onpolicy_vs_offpolicy.png"))
    print(f"base: sentiment {base['sentiment']:+.3f}")
    print("| pairs | beta | sentiment | KL per reply | on-policy at this KL | train loss | "
          "train acc |")
    print("|---|---|---|---|---|---|---|")
    for source in ("on", "off"):
        for r in results[source]:
            matched = r.get("on_policy_sentiment_at_this_kl")
            m = r["final_train_metrics"]
            print(f"| {source}-policy | {r['beta']:g} | {r['sentiment']:+.3f} ± "
                  f"{r['sentiment_se']:.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} | "
                  f"{'' if matched is None else f'{matched:+.3f}'} | {m['loss']:.3f} | "
                  f"{m['rewards/accuracy']:.2f} |")
    print("wall seconds", wall)


if __name__ == "__main__":
    main()

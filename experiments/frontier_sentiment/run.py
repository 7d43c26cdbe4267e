"""The controlled-sentiment frontier: VADER reward of samples against their KL to the reference.

    python experiments/frontier_sentiment/run.py [--steps 30] [--samples 4]

The DPO paper's Figure 2 on the quickstart's set-up. Every method trains SmolLM2-135M-Instruct
with LoRA from the same 147 on-policy pairs (`configs/experiments/quickstart.gin`, 30 steps,
lr 1e-3), changing only the objective:
- DPO at betas 0.03, 0.1, 0.3 and 1;
- IPO (beta 0.1), SimPO (the registry's defaults: beta 2, gamma/beta 0.25), cDPO (DPO with label
  smoothing 0.1), f-DPO with the Jensen-Shannon and forward-KL divergences (beta 0.1);
- GRPO in the online loop with VADER as the reward, on the same training prompts
  (`configs/experiments/grpo_sentiment.gin`: 16 iterations of 8 prompts x 4 samples, KL to the
  base model in the loss, beta 0.04);
and, with no training, best-of-N on the base model for N = 1, 2, 4, 8, 16 with VADER as the
scorer, at its analytic KL `log N - (N-1)/N`.
Then every policy samples `--samples` replies to each of the 41 held-out prompts (temperature 1,
48 tokens): mean VADER sentiment and the sampled KL to the base model per reply, each with its
standard error. The frontier is the set of points no other point beats (more sentiment at no
more KL). Writes `results.json` and `frontier.png` beside this file; runs go to `runs/frontier/`
and a rerun reuses finished ones.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentiment_lab as lab  # noqa: E402  (experiments/ is not an installed package)


def dpo(beta: float, **extra) -> list[str]:
    hyper = {"beta": beta, "label_smoothing": 0.0, **extra}
    return [f"--gin.AlgoConfig.hyper={{'dpo': {hyper!r}}}"]


def f_dpo(divergence: str) -> list[str]:
    return dpo(0.1) + [f"--gin.AlgoConfig.modifiers=[('f_divergence', "
                       f"{{'divergence': '{divergence}'}})]"]


# name -> (label in the table, gin arguments after the quickstart's config)
METHODS = {
    "dpo_b0.03": ("DPO beta 0.03", dpo(0.03)),
    "dpo_b0.1": ("DPO beta 0.1", dpo(0.1)),
    "dpo_b0.3": ("DPO beta 0.3", dpo(0.3)),
    "dpo_b1": ("DPO beta 1", dpo(1.0)),
    "ipo": ("IPO beta 0.1", ["configs/algos/ipo.gin"]),
    "simpo": ("SimPO (defaults)", ["configs/algos/simpo.gin"]),
    "cdpo": ("cDPO (smoothing 0.1)", dpo(0.1, label_smoothing=0.1)),
    "fdpo_js": ("f-DPO JS", f_dpo("js")),
    "fdpo_fkl": ("f-DPO forward KL", f_dpo("forward_kl")),
    "grpo": ("GRPO (online, VADER reward)", []),
}
# Methods trained from their own config (and its step count) instead of the quickstart's.
CONFIGS = {"grpo": "configs/experiments/grpo_sentiment.gin"}
BEST_OF = (1, 2, 4, 8, 16)


def best_of_n_kl(n: int) -> float:
    """KL of best-of-N to the base policy, `log N - (N-1)/N` (exact with no ties)."""
    return math.log(n) - (n - 1) / n


def best_of_n(base, tokenizer, prompts, seed: int, n_max: int = max(BEST_OF)) -> dict:
    """Best-of-N sentiment for each N from one draw of `n_max` base samples per prompt: the
    `n_max / N` disjoint groups of N give `n_max / N` best-of-N replies per prompt."""
    from prefopt_jax.rewards.sentiment import compound
    from prefopt_jax.sampling import search

    cands = search.sample_candidates(base, prompts, n_max, lab.sampling_config(tokenizer),
                                     seed, int(tokenizer.pad_token_id or 0))
    scores_bn = compound(lab.decode(tokenizer, cands)).reshape(len(prompts), n_max)
    out = {}
    for n in BEST_OF:
        best_q = scores_bn.reshape(len(prompts), n_max // n, n).max(-1).ravel()
        s, se = lab.mean_se(best_q)
        out[f"best_of_{n}"] = {"sentiment": s, "sentiment_se": se, "kl": best_of_n_kl(n),
                               "kl_se": 0.0, "replies": int(best_q.size)}
    return out


def plot(results: dict, front: list[str], trained: list[str], path: str) -> None:
    fig, ax = lab.subplots(figsize=(8, 5))
    bon = [f"best_of_{n}" for n in BEST_OF]
    ax.plot([results[k]["kl"] for k in bon], [results[k]["sentiment"] for k in bon], "k--",
            marker="s", ms=4, label="best-of-N on the base model (analytic KL)")
    for n, k in zip(BEST_OF, bon):
        ax.annotate(f"N={n}", (results[k]["kl"], results[k]["sentiment"]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    dpo_keys = [k for k in METHODS if k.startswith("dpo_") and k in results]
    ax.errorbar([results[k]["kl"] for k in dpo_keys], [results[k]["sentiment"] for k in dpo_keys],
                xerr=[results[k]["kl_se"] for k in dpo_keys],
                yerr=[results[k]["sentiment_se"] for k in dpo_keys], marker="o", color="C0",
                label="DPO (beta 0.03 ... 1)")
    for k in dpo_keys:
        ax.annotate(METHODS[k][0].replace("DPO ", ""), (results[k]["kl"], results[k]["sentiment"]),
                    fontsize=7, textcoords="offset points", xytext=(4, 4))
    for i, k in enumerate(k for k in METHODS if not k.startswith("dpo_") and k in results):
        ax.errorbar([results[k]["kl"]], [results[k]["sentiment"]], xerr=[results[k]["kl_se"]],
                    yerr=[results[k]["sentiment_se"]], marker="o^vDP"[i % 5], color=f"C{i + 1}",
                    ls="none", label=METHODS[k][0])
    ax.scatter([0], [results["base"]["sentiment"]], marker="*", s=120, color="k",
               label="base model", zorder=3)
    for keys, color, name in ((front, "grey", "frontier"),
                              (trained, "gold", "frontier of the trained policies")):
        xs, ys = zip(*sorted((results[k]["kl"], results[k]["sentiment"]) for k in keys))
        ax.step(xs, ys, where="post", color=color, alpha=0.5, lw=6, zorder=0, label=name)
    ax.set(xlabel="sampled KL(policy || base) per reply (nats)",
           ylabel="mean VADER sentiment of sampled replies",
           title="Sentiment against KL, 41 held-out prompts")
    lab.save_figure(fig, path, loc="lower right")


def main() -> None:
    p = lab.parser(__doc__)
    p.add_argument("--samples", type=int, default=4, help="held-out replies per prompt")
    p.add_argument("--runs", default="runs/frontier", help="output directories' parent")
    p.add_argument("--only", nargs="*", default=None,
                   help="train and evaluate these methods only, merging them into the existing "
                        "results.json (base and best-of-N are kept from it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    methods = {k: v for k, v in METHODS.items() if args.only is None or k in args.only}
    wall = {}
    for name, (_, gin_args) in methods.items():
        if name in CONFIGS:
            seconds = lab.train(f"{args.runs}/{name}", *gin_args, config=CONFIGS[name])
        else:
            seconds = lab.train(f"{args.runs}/{name}", *gin_args,
                                f"--gin.LoopConfig.steps={args.steps}")
        if seconds is not None:
            wall[name] = round(seconds, 1)

    base, tokenizer = lab.load_base()
    prompts = lab.prompt_ids(tokenizer, lab.read_prompts())
    t = time.time()
    path = os.path.join(HERE, "results.json")
    if args.only is None:
        results = {"base": lab.evaluate(base, base, tokenizer, prompts, args.samples, args.seed)}
        results.update(best_of_n(base, tokenizer, prompts, args.seed + 1))
        earlier = {"methods": {}, "wall_seconds": {}}
    else:
        with open(path) as f:
            earlier = json.load(f)
        results = earlier["results"]
    for name in methods:
        policy = lab.load_policy(f"{args.runs}/{name}")
        results[name] = lab.evaluate(policy, base, tokenizer, prompts, args.samples, args.seed)
        results[name]["final_train_metrics"] = lab.read_metrics(f"{args.runs}/{name}")[-1]
        print(name, {k: round(v, 3) for k, v in results[name].items()
                     if isinstance(v, float)}, flush=True)
    wall["evaluation" if args.only is None else f"evaluation_{'_'.join(args.only)}"] = round(
        time.time() - t, 1)
    points = {k: (r["kl"], r["sentiment"]) for k, r in results.items()}
    front = lab.pareto(points)
    trained = lab.pareto({k: p for k, p in points.items() if k in METHODS})
    described = {k: {"label": v[0], "gin": v[1], "config": CONFIGS.get(k, lab.QUICKSTART)}
                 for k, v in methods.items()}
    out = {"methods": {**earlier["methods"], **described},
           "results": results, "frontier": front, "trained_frontier": trained,
           "steps": args.steps,
           "samples_per_prompt": args.samples, "prompts": len(prompts),
           "wall_seconds": {**earlier["wall_seconds"], **wall},
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    lab.write_json(path, out)
    plot(results, front, trained, os.path.join(HERE, "frontier.png"))
    print("| method | sentiment | KL per reply | length | on the frontier | among trained |")
    print("|---|---|---|---|---|---|")
    for k, r in sorted(results.items(), key=lambda kv: kv[1]["kl"]):
        label = METHODS[k][0] if k in METHODS else k.replace("_", " ")
        print(f"| {label} | {r['sentiment']:+.3f} ± {r['sentiment_se']:.3f} | "
              f"{r['kl']:.2f} ± {r['kl_se']:.2f} | {r.get('length', float('nan')):.1f} | "
              f"{'yes' if k in front else ''} | {'yes' if k in trained else ''} |")
    print("wall seconds", wall)


if __name__ == "__main__":
    main()

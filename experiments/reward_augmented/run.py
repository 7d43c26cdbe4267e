"""Reward-augmented DPO: score-conditioned relabelling against plain DPO on the same pairs.

    python experiments/reward_augmented/run.py [--steps 30]

The paper ("Reward-Augmented Data Enhances Direct Preference Alignment of LLMs") turns each
scored pair `(x, y_w, y_l)` with scores `(r_w, r_l)` into two pairs conditioned on a score:
`(x | r_w, y_w, y_l)` and `(x | r_l, y_l, y_w)` (the response that matches the asked-for score
is preferred), trains DPO on them, and at inference asks for the best score. Here, on the
quickstart's 147 VADER-scored SmolLM2 pairs (`configs/experiments/quickstart.gin`, DPO beta 0.1
with LoRA, lr 1e-3), with the transform `DataSpec.relabel_with_scores = True` (the score goes into
a system turn, "Write a response that would be rated {score}."):
- `dpo`: plain DPO, `--steps` steps (batch 4);
- `ra_dpo`: DPO on the 294 relabelled pairs, the same number of steps (equal compute);
- `ra_dpo_epochs`: DPO on the relabelled pairs for twice the steps (equal epochs).
Each policy, and the base model as a control, answers the 41 held-out prompts; the relabelled
policies and the control are asked for a reply "rated 1" (the top of VADER's scale), and also
asked plainly. Reported: mean VADER sentiment of 4 sampled replies per prompt (temperature 1)
and of greedy replies, and the sampled KL to the base model given the same prompt. Writes
`results.json` and `reward_augmented.png` beside this file; runs go to `runs/reward_augmented/`.
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentiment_lab as lab  # noqa: E402  (experiments/ is not an installed package)

TARGET_SCORE = 1.0


def conditioned(prompts: list, score: float) -> list:
    """Each prompt with the relabelling's score instruction, as training wrote it."""
    from prefopt_jax.data import transforms

    return [transforms.condition_prompt(p, score, transforms.DEFAULT_SCORE_TEMPLATE,
                                        transforms.DEFAULT_SYSTEM_TEMPLATE) for p in prompts]


def plot(results: dict, path: str) -> None:
    fig, ax = lab.subplots(figsize=(7.5, 4.5))
    for i, (name, r) in enumerate(results.items()):
        ax.errorbar([r["kl"]], [r["sentiment"]], xerr=[r["kl_se"]], yerr=[r["sentiment_se"]],
                    marker="o^sDvP"[i % 6], color=f"C{i}", ls="none", capsize=3, label=name)
    ax.set(xlabel="sampled KL(policy || base) per reply, same prompt (nats)",
           ylabel="mean VADER sentiment of sampled replies",
           title="Reward-augmented DPO vs DPO, 41 held-out prompts")
    lab.save_figure(fig, path)


def main() -> None:
    p = lab.parser(__doc__)
    p.add_argument("--samples", type=int, default=4, help="held-out replies per prompt")
    p.add_argument("--runs", default="runs/reward_augmented", help="output directories' parent")
    args = p.parse_args()
    relabel = "--gin.DataSpec.relabel_with_scores=True"
    runs = {"dpo": [f"--gin.LoopConfig.steps={args.steps}"],
            "ra_dpo": [relabel, f"--gin.LoopConfig.steps={args.steps}"],
            "ra_dpo_epochs": [relabel, f"--gin.LoopConfig.steps={2 * args.steps}"]}
    wall = {}
    for name, gin_args in runs.items():
        seconds = lab.train(f"{args.runs}/{name}", *gin_args)
        if seconds is not None:
            wall[name] = round(seconds, 1)

    base, tokenizer = lab.load_base()
    plain = lab.read_prompts()
    asked = {"plain": lab.prompt_ids(tokenizer, plain),
             "rated 1": lab.prompt_ids(tokenizer, conditioned(plain, TARGET_SCORE))}
    t = time.time()
    cases = [("base", "base", "plain"), ("base, asked for 'rated 1'", "base", "rated 1"),
             ("DPO", "dpo", "plain"),
             ("RA-DPO, equal steps, asked for 'rated 1'", "ra_dpo", "rated 1"),
             ("RA-DPO, equal steps, plain prompt", "ra_dpo", "plain"),
             ("RA-DPO, equal epochs, asked for 'rated 1'", "ra_dpo_epochs", "rated 1"),
             ("RA-DPO, equal epochs, plain prompt", "ra_dpo_epochs", "plain")]
    results, policies = {}, {"base": base}
    for label, run, prompt_kind in cases:
        if run not in policies:
            policies = {"base": base, run: lab.load_policy(f"{args.runs}/{run}")}
        policy, prompts = policies[run], asked[prompt_kind]
        res = lab.evaluate(policy, base, tokenizer, prompts, args.samples)
        res["greedy_sentiment"] = float(lab.greedy_sentiment(policy, tokenizer, prompts).mean())
        res.update(run=run, prompt=prompt_kind)
        if run != "base":
            res["final_train_metrics"] = lab.read_metrics(f"{args.runs}/{run}")[-1]
        results[label] = res
        print(label, {k: round(v, 3) for k, v in res.items() if isinstance(v, float)},
              flush=True)
    wall["evaluation"] = round(time.time() - t, 1)
    lab.write_json(os.path.join(HERE, "results.json"),
                   {"results": results, "steps": args.steps, "samples_per_prompt": args.samples,
                    "target_score": TARGET_SCORE, "wall_seconds": wall})
    plot(results, os.path.join(HERE, "reward_augmented.png"))
    print("| policy and prompt | sampled sentiment | greedy sentiment | KL per reply | length |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['sentiment']:+.3f} ± {r['sentiment_se']:.3f} | "
              f"{r['greedy_sentiment']:+.3f} | {r['kl']:.2f} ± {r['kl_se']:.2f} | "
              f"{r['length']:.1f} |")
    print("wall seconds", wall)


if __name__ == "__main__":
    main()

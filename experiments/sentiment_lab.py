"""What the sentiment studies share: training runs through `prefopt`, and how a policy is measured.

The studies (`frontier_sentiment/`, `label_noise/`, `onpolicy_vs_offpolicy/`, `reward_augmented/`,
`implicit_reward_decline/`, `ranking_accuracy/`, `rto_sentiment/`) all start from the
quickstart's set-up: SmolLM2-135M-Instruct with LoRA, VADER's compound sentiment as the ground
truth, the quickstart's 147 training pairs and its 41 held-out prompts (subjects never seen in
training). Each study's `run.py` puts this folder on `sys.path` and imports this file; it is a
helper of the scripts, not part of the library.

Shape letters: `b` prompts, `n` samples per prompt, `q` = b * n replies, `c` reply positions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUICKSTART = "configs/experiments/quickstart.gin"
TRAIN = "experiments/quickstart/data/train.jsonl"
HELDOUT = "experiments/quickstart/data/heldout.jsonl"
MODEL = "smollm2-135m-instruct"


def parser(doc: str, steps: int = 30) -> argparse.ArgumentParser:
    """A study's command line (`--steps`: training steps per run), after keeping freed host
    memory, which must happen before JAX starts (see prefopt_jax/hostmem.py)."""
    from prefopt_jax import hostmem

    hostmem.keep_freed_memory()
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--steps", type=int, default=steps, help="training steps of each run")
    return p


def subplots(*args, **kwargs):
    """`plt.subplots` on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str, legend_axes=None, **legend_kw) -> None:
    """Grids on every panel, legends on `legend_axes` (default: all), saved as a PNG."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    for ax in fig.axes if legend_axes is None else legend_axes:
        ax.legend(**{"fontsize": 7, **legend_kw})
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def prefopt(*args: str) -> float:
    """`prefopt ARGS` from the repository root (output streams through); its wall time in s."""
    t = time.time()
    subprocess.run([sys.executable, "-m", "prefopt_jax.cli", *args], cwd=ROOT, check=True)
    return time.time() - t


def train(out: str, *args: str, config: str = QUICKSTART) -> float | None:
    """Trains `config` + `args` into `out` unless `out/export` exists; the wall time, or None when
    the run was already there (a rerun of a study reuses finished runs and resumes cut ones)."""
    if os.path.isdir(os.path.join(ROOT, out, "export")):
        return None
    return prefopt("train", config, *args, f"--gin.LoopConfig.output_dir='{out}'")


def train_in_stages(out: str, steps: int, every: int, *args: str, config: str = QUICKSTART):
    """Trains `config` + `args` into `out` for `steps` steps in stages of `every`, yielding
    (step, seconds) after each stage, whose policy is then in `out/export`. Each stage resumes
    the previous one exactly (the loader position and RNG are in the checkpoint), and
    `OptimConfig.total_steps` keeps the schedule of one `steps`-step run, so the stages follow
    that run's trajectory. A run already in `out` is removed first."""
    shutil.rmtree(os.path.join(ROOT, out), ignore_errors=True)
    for stage in range(every, steps + 1, every):
        yield stage, prefopt("train", config, *args, f"--gin.LoopConfig.output_dir='{out}'",
                             f"--gin.LoopConfig.steps={stage}",
                             f"--gin.OptimConfig.total_steps={steps}",
                             f"--gin.LoopConfig.checkpoint_every={every}")


def read_metrics(out: str) -> list[dict]:
    """A run's per-step metric records (`metrics.jsonl`)."""
    with open(os.path.join(ROOT, out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_base():
    """(SmolLM2-135M-Instruct, its tokenizer): the reference of every study."""
    from prefopt_jax.models.spec import ModelSpec, load_model

    return load_model(ModelSpec(source=MODEL))


def load_policy(path: str):
    """A policy: a finished run's export (`path` the run directory or its `export/`)."""
    from prefopt_jax.models.spec import ModelSpec, load_model

    path = os.path.join(ROOT, path)
    if os.path.isdir(os.path.join(path, "export")):
        path = os.path.join(path, "export")
    return load_model(ModelSpec(source=path))[0]


def read_prompts(path: str = HELDOUT) -> list:
    """The prompts (message lists) of a preference file, one per row, in file order."""
    with open(os.path.join(ROOT, path)) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def prompt_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt with the chat template and the generation prompt."""
    from prefopt_jax.sampling.onpolicy import prompt_ids as ids_of

    return [ids_of(tokenizer, p) for p in prompts]


def sampling_config(tokenizer, max_new_tokens: int = 48, temperature: float = 1.0):
    from prefopt_jax.sampling.generate import SamplingConfig

    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                          stop_ids=(int(tokenizer.eos_token_id),))


def decode(tokenizer, candidates) -> list[str]:
    """The reply texts of sampled candidates, prompt-major (`q = b * n`)."""
    tokens_qc = candidates.tokens_bnc.reshape(-1, candidates.tokens_bnc.shape[-1])
    mask_qc = candidates.mask_bnc.reshape(tokens_qc.shape)
    return [tokenizer.decode(t[m > 0], skip_special_tokens=True)
            for t, m in zip(tokens_qc, mask_qc)]


def mean_se(x) -> tuple[float, float]:
    """Mean and its standard error."""
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def evaluate(policy, base, tokenizer, prompts: list[list[int]], samples: int = 4, seed: int = 0,
             max_new_tokens: int = 48) -> dict:
    """Mean VADER sentiment of `samples` replies per prompt (temperature 1) and the sampled KL
    `KL(policy || base)` per reply (k1: the mean of summed log-ratios), each with its standard
    error; the mean reply length in tokens; the first replies."""
    from prefopt_jax.rewards.sentiment import compound
    from prefopt_jax.sampling import scorers, search

    pad = int(tokenizer.pad_token_id or 0)
    ours = search.sample_candidates(policy, prompts, samples, sampling_config(
        tokenizer, max_new_tokens), seed, pad)
    texts = decode(tokenizer, ours)
    mask_qc = ours.mask_bnc.reshape(len(texts), -1)
    if policy is base:
        kl_q = np.zeros(len(texts))
    else:
        ref_qc = scorers.completion_logps(base, ours, pad).reshape(mask_qc.shape)
        kl_q = ((ours.logps_bnc.reshape(mask_qc.shape) - ref_qc) * mask_qc).sum(-1)
    sentiment_q = compound(texts)
    (s, s_se), (kl, kl_se) = mean_se(sentiment_q), mean_se(kl_q)
    return {"sentiment": s, "sentiment_se": s_se, "kl": kl, "kl_se": kl_se,
            "replies": len(texts), "length": float(mask_qc.sum(-1).mean()),
            "examples": texts[:3]}


def greedy_sentiment(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 48):
    """VADER sentiment `[b]` of each prompt's greedy reply."""
    from prefopt_jax.rewards.sentiment import compound
    from prefopt_jax.sampling import search

    cands = search.sample_candidates(model, prompts, 1, sampling_config(
        tokenizer, max_new_tokens, 0.0), 0, int(tokenizer.pad_token_id or 0))
    return compound(decode(tokenizer, cands))


def pair_metrics(policy, base, tokenizer, beta: float, path: str = HELDOUT) -> dict:
    """Implicit-reward accuracy, ranking accuracies and margin on a file of pairs
    (`evals.policy_eval.pair_metrics`, through the training data path)."""
    from prefopt_jax.evals import policy_eval

    data = policy_eval.load_pairs(os.path.join(ROOT, path), tokenizer, max_length=None)
    return policy_eval.pair_metrics(policy, base, data, beta)


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (KL, reward) no other point beats: lower or equal KL with higher reward,
    or lower KL with equal reward. Ordered by KL."""
    front = [name for name, (kl, r) in points.items()
             if not any((k2 <= kl and r2 > r) or (k2 < kl and r2 >= r)
                        for other, (k2, r2) in points.items() if other != name)]
    return sorted(front, key=lambda name: points[name][0])


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)

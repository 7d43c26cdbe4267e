"""The quickstart's report: did DPO make the replies more positive, and at what KL cost?

    python experiments/quickstart/report.py [CONFIG.gin ...] [--gin.NAME=VALUE ...]

reads a finished run in `LoopConfig.output_dir` (the exported policy in `export/` and
`metrics.jsonl`), evaluates it on the held-out prompts (subjects never seen in training), writes
`report.json`, `report.md` and `curves.png` there and prints `report.md`:

- held-out reward accuracy: how often the implicit reward `b * (log pi - log ref)` of the chosen
  reply beats the rejected one's on held-out pairs;
- mean VADER sentiment of greedy replies from the reference (base) model and from the policy;
- KL(policy || reference), estimated from policy samples (temperature 1) as the mean over samples
  of `sum_t log pi(y_t) - log ref(y_t)`;
- a few replies side by side (the first prompts, not picked) and the training curves.

Shape letters: `b` rows, `t` row positions, `n` new tokens, `q` sequences, `c` completion
positions, `p` pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_CONFIG = "configs/experiments/quickstart.gin"
DEFAULT_HELDOUT = "experiments/quickstart/data/heldout.jsonl"
STAGES = 6


@dataclasses.dataclass(frozen=True)
class Specs:
    """The frozen specs `prefopt train` builds from the gin files (tiny switch applied)."""

    model: object
    data: object
    algo: object
    optim: object
    loop: object


def resolve(configs: list[str], bindings: list[str]) -> Specs:
    """The specs of a gin run, built by the engine's own entry point with training left out.

    Going through `registry.train` (not re-reading bindings here) keeps the report in step with
    whatever the engine does to specs, such as the `train.tiny` switch.
    """
    from prefopt_jax import registry

    registry.parse(configs, bindings)
    captured = {}
    saved = registry.loop_train
    registry.loop_train = lambda *specs: captured.update(specs=specs)
    try:
        registry.train()
    finally:
        registry.loop_train = saved
    return Specs(*captured["specs"])


class Progress:
    """Numbered stage lines with timings, so a long report shows where it is."""

    def __init__(self):
        self.stage, self.t0, self.times = 0, time.time(), {}

    def __call__(self, name: str):
        self.stage += 1
        print(f"[report {self.stage}/{STAGES}] {name} ...", flush=True)
        return self._Timer(self, name)

    class _Timer:
        def __init__(self, progress, name):
            self.progress, self.name = progress, name

        def __enter__(self):
            self.start = time.time()

        def __exit__(self, *exc):
            seconds = time.time() - self.start
            self.progress.times[self.name] = round(seconds, 1)
            if exc[0] is None:
                print(f"[report {self.progress.stage}/{STAGES}] {self.name}: {seconds:.0f}s",
                      flush=True)


def load_tokenizer(source: str):
    """Tokenizer of a built-in model name, a .gguf file or a HF directory (local files only)."""
    from prefopt_jax.models import hf, tokenizer as tokenizer_lib

    if source in hf.BUILTIN_MODELS:
        source = str(hf.builtin_path(source))
    if source.endswith(".gguf"):
        return tokenizer_lib.load_gguf_tokenizer(source)
    return tokenizer_lib.load_tokenizer(source)


def load_models(specs: Specs, tokenizer_source: str):
    """(reference, policy, tokenizer): the base model and the exported policy (LoRA merged)."""
    from prefopt_jax.models import from_pretrained
    from prefopt_jax.models.spec import load_model

    reference, tokenizer = load_model(dataclasses.replace(specs.model, lora=None))
    export = os.path.join(specs.loop.output_dir, "export")
    if not os.path.isdir(export):
        raise FileNotFoundError(f"{export} does not exist: train first (LoopConfig.export=True)")
    # The same overrides (scan_layers, ...) as the reference, so both share one compiled decode.
    policy, _ = from_pretrained(export, dtype=jnp.dtype(specs.model.dtype), load_tokenizer=False,
                                **dict(specs.model.overrides))
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_source)
    return reference, policy, tokenizer


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logps(graphdef, state, batch):
    from prefopt_jax.scoring import logps as logps_lib

    return logps_lib.token_logps(nnx.merge(graphdef, state), batch) * batch["completion_mask"]


LOGPS_KEYS = ("tokens", "positions", "segment_ids", "branch_ids", "source_index",
              "target_tokens", "completion_mask")


def token_logps(model, batch: dict) -> np.ndarray:
    """Masked per-token log-probs `[Q, C]` (one compile per model structure and batch shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_token_logps(graphdef, state, {k: batch[k] for k in LOGPS_KEYS}))


def heldout_rewards(reference, policy, tokenizer, path: str, beta: float, max_length,
                    batch_size: int = 8) -> dict:
    """Implicit-reward accuracy and margin on held-out pairs, through the training data path."""
    from prefopt_jax import data as data_lib
    from prefopt_jax.train import driver

    data, _ = data_lib.prepare(data_lib.open_source(path), tokenizer,
                               data_lib.DataConfig(max_length=max_length))
    loader = data_lib.Loader(data, batch_size, data_lib.LayoutConfig(kind="padded"),
                             shuffle=False, num_epochs=1)
    # One shape for every batch, so each model compiles once.
    shape = driver.agreed_shape(loader, loader.steps_per_epoch)
    margins = []
    for _ in range(loader.steps_per_epoch):
        batch = loader.next_batch(min_shape=shape)
        seq_q = (token_logps(policy, batch) - token_logps(reference, batch)).sum(-1)
        reward_p2 = beta * seq_q.reshape(-1, 2)
        valid_p = batch["pair_valid"] > 0
        margins.extend((reward_p2[:, 0] - reward_p2[:, 1])[valid_p].tolist())
    margins = np.asarray(margins)
    return {"heldout_pairs": int(margins.size),
            "reward_accuracy": float(np.mean(margins > 0)),
            "reward_margin": float(np.mean(margins))}


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation with the generation prompt (chat template applied)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def read_prompts(path: str, limit: int | None) -> list[list[dict]]:
    """The distinct prompts (message lists) of a preference file, in file order."""
    seen, prompts = set(), []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            messages = json.loads(line)["prompt"]
            key = json.dumps(messages, sort_keys=True)
            if key not in seen:
                seen.add(key)
                prompts.append(messages)
    return prompts[:limit] if limit else prompts


def sample(model, tokenizer, ids: list[list[int]], max_new_tokens: int, temperature: float,
           seed: int = 0):
    """(texts, generation): one batch for all prompts, so the decode loop compiles once."""
    from prefopt_jax.commands.generate import stop_ids_of
    from prefopt_jax.sampling.generate import SamplingConfig, generate

    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_ids=stop_ids_of(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = generate(model, ids, config, rng=seed, pad_id=pad_id)
    texts = [tokenizer.decode(t[:n], skip_special_tokens=True).strip()
             for t, n in zip(out.tokens_bn, out.lengths_b)]
    return texts, out


def completion_batch(ids: list[list[int]], tokens_bn: np.ndarray, mask_bn: np.ndarray) -> dict:
    """Prompt + sampled reply per row (right-padded), scoring the reply's tokens."""
    b, n = tokens_bn.shape
    length = max(len(p) for p in ids) + n
    batch = {k: np.zeros((b, length), np.int32)
             for k in ("tokens", "positions", "segment_ids", "branch_ids")}
    for i, p in enumerate(ids):
        row = list(p) + list(tokens_bn[i, :int(mask_bn[i].sum())])
        batch["tokens"][i, :len(row)] = row
        batch["positions"][i, :len(row)] = np.arange(len(row))
        batch["segment_ids"][i, :len(row)] = 1
    # The output at position len(p) - 1 + j predicts reply token j.
    starts_b = np.asarray([i * length + len(p) - 1 for i, p in enumerate(ids)])
    batch["source_index"] = (starts_b[:, None] + np.arange(n)[None]).astype(np.int32)
    batch["target_tokens"] = tokens_bn.astype(np.int32)
    batch["completion_mask"] = mask_bn.astype(np.float32)
    return batch


def sampled_kl(reference, policy, ids, generation) -> dict:
    """KL(policy || reference) from policy samples: mean of summed per-token log-ratios."""
    batch = completion_batch(ids, generation.tokens_bn, generation.mask_bn)
    kl_b = (token_logps(policy, batch) - token_logps(reference, batch)).sum(-1)
    return {"kl": float(np.mean(kl_b)),
            "kl_stderr": float(np.std(kl_b) / np.sqrt(max(len(kl_b) - 1, 1))),
            "kl_samples": int(len(kl_b)),
            "policy_sample_tokens": float(np.mean(generation.lengths_b))}


def read_metrics(path: str) -> list[dict]:
    """The run's per-step metric records."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: str) -> None:
    """Loss, reward accuracy and reward margins per step (raw and a moving average) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray([r["step"] for r in records])
    panels = (("loss", ("loss",)), ("reward accuracy", ("rewards/accuracy",)),
              ("implicit rewards", ("rewards/chosen", "rewards/rejected", "rewards/margin")))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            y = np.asarray([r.get(name, np.nan) for r in records], np.float64)
            line, = ax.plot(steps, y, alpha=0.3, lw=1)
            # A short moving average: single DPO batches are noisy.
            w = max(1, min(8, len(y) // 5))
            smooth = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1:], smooth, color=line.get_color(), lw=2, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def side_by_side(prompts, ref_texts, pol_texts, ref_scores, pol_scores, count: int) -> list:
    """The first `count` prompts with both greedy replies and their sentiment."""
    return [{"prompt": prompts[i][-1]["content"],
             "reference": ref_texts[i], "reference_sentiment": float(ref_scores[i]),
             "policy": pol_texts[i], "policy_sentiment": float(pol_scores[i])}
            for i in range(min(count, len(prompts)))]


def markdown(result: dict) -> str:
    """report.md: the figures as a table, then replies side by side."""
    s = result["sentiment"]
    lines = [
        f"# Quickstart report: {result['run_dir']}", "",
        "| figure | value |", "|---|---|",
        f"| mean sentiment of greedy replies, reference | {s['reference']:+.3f} |",
        f"| mean sentiment of greedy replies, policy | {s['policy']:+.3f} |",
        f"| sentiment change | {s['policy'] - s['reference']:+.3f} "
        f"({s['improved']}/{s['prompts']} prompts up, {s['worsened']} down) |",
        f"| mean greedy reply length (tokens), reference / policy | "
        f"{s['reference_tokens']:.1f} / {s['policy_tokens']:.1f} |",
        f"| held-out reward accuracy ({result['heldout_pairs']} pairs) | "
        f"{result['reward_accuracy']:.3f} |",
        f"| held-out reward margin | {result['reward_margin']:+.3f} |",
        f"| KL(policy ‖ reference), {result['kl_samples']} samples | "
        f"{result['kl']:.3f} ± {result['kl_stderr']:.3f} nats |",
        f"| training steps | {result['steps']} |",
        f"| wall time (s) | {json.dumps(result['seconds'])} |",
        f"| load average at the end | {result['load_average']} |",
        "", "Training curves: `curves.png`.", "",
        "## Greedy replies side by side (the first held-out prompts)", ""]
    for row in result["side_by_side"]:
        lines += [f"**{row['prompt']}**", "",
                  f"- reference ({row['reference_sentiment']:+.2f}): {row['reference']}",
                  f"- policy ({row['policy_sentiment']:+.2f}): {row['policy']}", ""]
    return "\n".join(lines)


def evaluate(specs: Specs, args, progress: Progress) -> dict:
    """Every figure of the report (prints a line per stage)."""
    from prefopt_jax.rewards import sentiment

    with progress("load the reference and the exported policy"):
        reference, policy, tokenizer = load_models(specs, args.tokenizer or specs.model.source)
    beta = float(dict(specs.algo.hyper).get("beta", 0.1))
    with progress("held-out reward accuracy"):
        result = heldout_rewards(reference, policy, tokenizer, args.heldout, beta,
                                 specs.data.max_length)
    prompts = read_prompts(args.heldout, args.prompts)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    with progress(f"greedy replies of the reference to {len(ids)} held-out prompts"):
        ref_texts, ref_out = sample(reference, tokenizer, ids, args.max_new_tokens, 0.0)
    with progress(f"greedy replies of the policy to {len(ids)} held-out prompts"):
        pol_texts, pol_out = sample(policy, tokenizer, ids, args.max_new_tokens, 0.0)
    with progress(f"KL from {len(ids)} policy samples"):
        _, generation = sample(policy, tokenizer, ids, args.max_new_tokens, 1.0, args.seed)
        result.update(sampled_kl(reference, policy, ids, generation))
    ref_scores, pol_scores = sentiment.compound(ref_texts), sentiment.compound(pol_texts)
    result["sentiment"] = {
        "reference": float(ref_scores.mean()), "policy": float(pol_scores.mean()),
        "prompts": len(ids), "improved": int(np.sum(pol_scores > ref_scores)),
        "worsened": int(np.sum(pol_scores < ref_scores)),
        # Reply length can carry sentiment gains (more words, more sentiment), so report it.
        "reference_tokens": float(np.mean(ref_out.lengths_b)),
        "policy_tokens": float(np.mean(pol_out.lengths_b))}
    result["side_by_side"] = side_by_side(prompts, ref_texts, pol_texts, ref_scores,
                                          pol_scores, args.side_by_side)
    result["replies"] = {"reference": ref_texts, "policy": pol_texts}
    return result


def report(specs: Specs, args, seconds: dict | None = None) -> dict:
    """Evaluates the run, writes report.json, report.md and curves.png, prints report.md."""
    progress = Progress()
    run_dir = specs.loop.output_dir
    result = evaluate(specs, args, progress)
    with progress("training curves"):
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        plot_curves(records, os.path.join(run_dir, "curves.png"))
    result.update(run_dir=run_dir, steps=len(records), final_train_metrics=records[-1],
                  load_average=[round(x, 2) for x in os.getloadavg()],
                  seconds={**(seconds or {}), "report": round(time.time() - progress.t0, 1)})
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return result


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """CONFIG.gin files, `--gin.NAME=VALUE` bindings and the report's own options."""
    from prefopt_jax.commands.train import split_gin_args

    rest, bindings = split_gin_args(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(description=description)
    p.add_argument("config", nargs="*", default=[DEFAULT_CONFIG], help="gin files")
    p.add_argument("--heldout", default=DEFAULT_HELDOUT, help="held-out preference file")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts to use (all)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--side-by-side", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="seed of the KL samples")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer source when the model has none (the tiny random model)")
    args = p.parse_args(rest)
    args.config = args.config or [DEFAULT_CONFIG]
    args.gin_bindings = bindings
    return args


def main(argv: list[str] | None = None) -> int:
    from prefopt_jax import hostmem

    hostmem.keep_freed_memory()  # before JAX starts (see prefopt_jax/hostmem.py)
    args = parse_args(argv, __doc__.splitlines()[0])
    report(resolve(args.config, args.gin_bindings), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

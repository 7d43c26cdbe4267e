"""Seconds per GRPO iteration (generation + update) of the online loop, beside TRL's GRPOTrainer.

    python benchmarks/grpo_step.py                      # SmolLM2, 8 prompts x G=8, 64 new tokens
    python benchmarks/grpo_step.py --dtypes float32,bfloat16 --layouts prefix,prefix_packed
    python benchmarks/grpo_step.py --model tiny --frameworks prefopt   # seconds, a smoke check

One iteration: every prompt sampled `--group-size` times (at most `--max-new-tokens`, stopping at
EOS, but not before `--min-new-tokens`), the samples scored by the same TRL-convention reward
function on both sides (the share of digits in the reply), then one optimiser step of GRPO
(`--beta`, 0.04 by default, so a reference forward too; at 0 neither side builds a reference)
on all of them (mu = 1).
prefopt-jax runs `online.rl.RolloutTask` as `prefopt train` does:
the sampler prefills each prompt once and copies its KV cache to its G samples, and the update
lays the samples out as `padded` rows (a row per sample, the prompt repeated), `packed` rows,
`prefix` rows (a row per group: the prompt once, its G samples as branches), or
`prefix_packed` rows (groups cut into runs of the prompt and the samples that fit, packed into
short rows). The sampler drops finished rows as it goes (it halves its batch each time at most
half the rows are still sampling). The update's rows take one of a few shapes
(`online.rl.rollout_layout`) and the sampler's batch one of a few sizes, each compiled once.
After the first iteration, iterations run until `--iterations` of them compiled nothing (at
most `--max-warmup` more): those are timed. The seconds of the ones that compiled are printed
as `compiling_iterations`: a one-off cost of a run, not its steady state. TRL 1.16's
GRPOTrainer (benchmarks/trl_grpo.py) runs the same model (exported to HF format), prompts,
reward, group size and token budget, when torch, trl and peft are installed. Each
configuration runs in its own process.

Printed per configuration (one JSON line): seconds per iteration, generation seconds and
generated tokens/s, update seconds and update tokens/s (prompt + completion tokens of every
sample, as a padded trainer processes them, so layouts and TRL compare), and the update's MFU
against the measured matmul peak of this machine (FLOPs: 8 per weight per real row token for
the policy's forward and backward and the reference's forward, 6 under LoRA, 2 fewer at beta 0
without the reference; the vocabulary
projection only on completion tokens; see benchmarks/dpo_step.py). Samples differ between the
frameworks (different samplers), so their lengths differ: compare tokens/s as well as seconds.

The closing `equal_work` lines put each configuration at TRL's token counts (see `equal_work`)
beside the least time that work can take on this machine: its matmul FLOPs at the measured
peak (`peak_seconds`, a bound no implementation of the same algorithm beats), the speed-up over
TRL that bound allows, the share of the peak this configuration reaches, and the share that
`--target-speedup` would need.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def digit_share(prompts, completions, **_) -> list[float]:
    """The share of digits among the reply's non-space characters (a reward with variance)."""
    out = []
    for c in completions:
        chars = [ch for ch in c if not ch.isspace()]
        out.append(sum(ch.isdigit() for ch in chars) / max(len(chars), 1))
    return out


def prompts_text(n: int) -> list[str]:
    """`n` arithmetic questions as plain text (no chat template, on both sides)."""
    return [f"Question: what is {7 + 3 * i} plus {12 + 5 * i}? Answer:" for i in range(n)]


def bench_prefopt(args) -> dict:
    """One layout x dtype x mode of the online loop: `iterations` timed after a warm-up."""
    import jax
    import numpy as np
    from flax import nnx

    from dpo_step import matmul_peak_flops
    from prefopt_jax.models.lora import LoraConfig
    from prefopt_jax.models.spec import ModelSpec
    from prefopt_jax.online import rl
    from prefopt_jax.sampling import generate
    from prefopt_jax.sampling.onpolicy import prompt_ids
    from prefopt_jax.train import build, loop, optim

    lora = LoraConfig(rank=args.lora_rank) if args.modes == "lora" else None
    spec = ModelSpec(source=args.model, dtype=args.dtypes, param_dtype="float32", lora=lora)
    config = rl.RLConfig(prompts_per_iteration=args.prompts, group_size=args.group_size,
                         max_new_tokens=args.max_new_tokens, rewards=(digit_share,),
                         min_new_tokens=args.min_new_tokens)
    out_dir = tempfile.mkdtemp()
    holder = {}

    class Task(rl.RolloutTask):  # the prompts, tokenised by the model's own tokenizer
        def first_loader(self, model, vocab_size):
            texts = prompts_text(args.prompts)
            ids = ([[1 + (7 * i + j) % 40 for j in range(8)] for i in range(args.prompts)]
                   if self.tokenizer is None else [prompt_ids(self.tokenizer, t) for t in texts])
            self.prompts = rl.Prompts(ids, texts, {})
            holder["model"] = model
            return super().first_loader(model, vocab_size)

    t0 = time.perf_counter()
    task = Task(spec, loop.DataSpec(layout=args.layouts, micro_batches=args.micro_batches),
                build.AlgoConfig(loss="grpo", hyper={"grpo": {"beta": args.beta}}),
                optim.OptimConfig(learning_rate=1e-6, schedule="constant", warmup_steps=0),
                loop.LoopConfig(output_dir=out_dir, logps_chunk=args.chunk), rl=config)
    model = holder.pop("model")
    cfg = model.config
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    head = cfg.vocab_size * cfg.hidden_size
    body = n_params - head * (1 if cfg.tie_word_embeddings else 2)
    del model
    rows, compiling = [], []
    step_fn, positions = task.step_fn, []

    def counting(state, batch):  # the batch's real (non-padding) row positions
        positions.append(int(np.count_nonzero(jax.device_get(batch["segment_ids"]))))
        return step_fn(state, batch)

    task.step_fn = counting
    compiled = lambda: (step_fn._cache_size(), generate._decode._cache_size())  # noqa: E731
    with jax.set_mesh(task.mesh):
        task.step(1)  # compiles the update (the sampler compiled in the first iteration)
        warm = time.perf_counter() - t0
        for number in range(2, args.iterations + args.max_warmup + 2):
            before = compiled()
            positions.clear()
            t = time.perf_counter()
            batch = task.step(number)[0]
            seconds = time.perf_counter() - t
            if compiled() != before:  # a new shape: compiling, not the steady state
                compiling.append(seconds)
                continue
            data = task.rollouts.data
            completion = int(data.completion_lengths_nk.sum())
            logical = int((data.prompt_lengths_n[:, None] + data.completion_lengths_nk).sum())
            row_tokens = sum(positions)
            gen = task.rollouts.metrics["generation/seconds"]
            rows.append((seconds, gen, completion, logical, row_tokens, batch["tokens"]))
            if len(rows) == args.iterations:
                break
    if not rows:
        raise SystemExit(f"every iteration compiled a new shape ({len(compiling)}); "
                         "raise --max-warmup")
    seconds, gen, completion, logical, row_tokens, _ = (np.mean(x) for x in zip(*rows))
    update = seconds - gen
    flops = flops_per_weight(args.modes, args.beta) * (body * row_tokens + head * completion)
    peak = matmul_peak_flops(args.dtypes)
    return {"framework": "prefopt-jax", "model": args.model, "layout": args.layouts,
            "mode": args.modes, "dtype": args.dtypes, "beta": args.beta, "prompts": args.prompts,
            "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
            "seconds_per_iteration": seconds, "generation_seconds": gen,
            "update_seconds": update, "generation_tokens_per_s": completion / gen,
            "update_tokens_per_s": logical / update, "row_tokens_per_iteration": row_tokens,
            "completion_tokens_per_iteration": completion,
            "update_tokens_per_iteration": logical, "iterations_timed": len(rows),
            "compiling_iterations": [round(x, 1) for x in compiling], "warmup_seconds": warm,
            "mfu": flops / update / peak, "matmul_peak_flops": peak,
            "body_params": int(body), "head_params": int(head),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def flops_per_weight(mode: str, beta: float) -> int:
    """Update FLOPs per weight per token: forward 2, backward 4 (2 under LoRA: no weight
    gradient of the frozen base), and the reference's forward 2 unless beta is 0."""
    return (6 if mode == "full" else 4) + (2 if beta != 0 else 0)


def bench_trl(args) -> dict:
    """TRL's GRPOTrainer on the same model (exported to HF format), prompts and reward."""
    from prefopt_jax.models import save_pretrained
    from prefopt_jax.models.spec import ModelSpec, load_model
    from trl_grpo import bench_trl_grpo

    model, tokenizer = load_model(ModelSpec(source=args.model))
    directory = tempfile.mkdtemp()
    save_pretrained(model, directory, tokenizer)
    del model
    out = bench_trl_grpo(directory, prompts_text(args.prompts), digit_share,
                         group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                         dtype=args.dtypes, iterations=args.iterations + 1,
                         lora_rank=args.lora_rank if args.modes == "lora" else None,
                         beta=args.beta, min_new_tokens=args.min_new_tokens)
    return dict(out, layout="padded", model=args.model)


def configurations(args):
    """(framework, layout, dtype, mode); TRL only when installed and the model has a tokenizer."""
    from prefopt_jax.models import presets

    trl = (importlib.util.find_spec("trl") and args.model != "tiny"
           and not presets.is_random(args.model))
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            if "prefopt" in args.frameworks:
                for layout in args.layouts.split(","):
                    yield "prefopt", layout, dtype, mode
            if "trl" in args.frameworks and trl:
                yield "trl", "padded", dtype, mode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0, help="no EOS before this many "
                   "tokens, on both sides (at --max-new-tokens every sample has that length, "
                   "so both sides do the same work)")
    p.add_argument("--iterations", type=int, default=4, help="timed iterations: after the "
                   "first, those that compile nothing")
    p.add_argument("--max-warmup", type=int, default=6, help="iterations that compile a new "
                   "shape, at most, on top of --iterations")
    p.add_argument("--layouts", default="padded,packed,prefix,prefix_packed")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="full", help="full and/or lora")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--beta", type=float, default=0.04, help="GRPO's KL coefficient on both "
                   "sides (TRL's own default is 0: no reference model)")
    p.add_argument("--frameworks", default="prefopt,trl")
    p.add_argument("--target-speedup", type=float, default=3.0, help="the speed-up over TRL "
                   "whose share of the matmul peak the equal_work lines print")
    p.add_argument("--framework", help=argparse.SUPPRESS)  # internal: run one configuration
    args = p.parse_args()
    if args.framework:
        from prefopt_jax import hostmem
        hostmem.keep_freed_memory()
        out = bench_trl(args) if args.framework == "trl" else bench_prefopt(args)
        print("RESULT " + json.dumps(out), flush=True)
        return
    results = []
    for framework, layout, dtype, mode in configurations(args):
        cmd = [sys.executable, __file__, *sys.argv[1:], f"--framework={framework}",
               f"--layouts={layout}", f"--dtypes={dtype}", f"--modes={mode}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else {
            "framework": framework, "layout": layout, "dtype": dtype, "mode": mode,
            "error": (proc.stderr or proc.stdout)[-800:]})
        print(json.dumps(results[-1]), flush=True)
    for line in equal_work(results, args.target_speedup):
        print(json.dumps(line))


def equal_work(results: list[dict], target: float = 3.0) -> list[dict]:
    """Each prefopt-jax configuration at TRL's token counts (same dtype and mode): its
    generation and update tokens/s applied to the tokens TRL sampled and updated on. The
    frameworks' samples differ in length, so seconds per iteration alone compare unequal work.

    Beside it, the least time that work takes at the measured matmul peak (`peak_seconds`):
    sampling costs 2 FLOPs per weight per completion token, the update `flops_per_weight` per
    body weight per completion token and per prompt token once per group (the prompt shared,
    the fewest any layout computes) and per vocabulary weight per completion token, as in the
    MFU. Attention, the optimiser and the decode's memory traffic are left out, so no
    implementation beats it. `speedup_at_peak` is TRL's seconds over it; `share_of_peak` the
    share of the peak this configuration reaches at TRL's tokens; `share_for_target` the share
    a speed-up of `target` over TRL needs."""
    done = [r for r in results if "error" not in r]
    lines = []
    for trl in (r for r in done if r["framework"].startswith("trl")):
        for ours in (r for r in done if r["framework"] == "prefopt-jax"
                     and (r["dtype"], r["mode"]) == (trl["dtype"], trl["mode"])):
            completion = trl["completion_tokens_per_iteration"]
            prompt = trl["update_tokens_per_iteration"] - completion
            seconds = (completion / ours["generation_tokens_per_s"]
                       + trl["update_tokens_per_iteration"] / ours["update_tokens_per_s"])
            body, head = ours["body_params"], ours["head_params"]
            per_weight = flops_per_weight(ours["mode"], ours.get("beta", 0.04))
            flops = (2 * (body + head) * completion
                     + per_weight * (body * (completion + prompt / ours["group_size"])
                                     + head * completion))
            peak = flops / ours["matmul_peak_flops"]
            trl_seconds = trl["seconds_per_iteration"]
            lines.append({"equal_work": ours["layout"], "dtype": ours["dtype"],
                          "mode": ours["mode"], "seconds_at_trl_tokens": round(seconds, 2),
                          "trl_seconds": round(trl_seconds, 2),
                          "speedup": round(trl_seconds / seconds, 2),
                          "peak_seconds": round(peak, 2),
                          "speedup_at_peak": round(trl_seconds / peak, 2),
                          "share_of_peak": round(peak / seconds, 2),
                          "share_for_target": round(peak * target / trl_seconds, 2)})
    return lines


if __name__ == "__main__":
    main()

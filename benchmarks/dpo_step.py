"""Tokens/s, MFU and peak memory of one DPO step per layout on a long-tailed length mix.

    python benchmarks/dpo_step.py --model smollm2-135m-instruct --examples 8 --steps 2
    python benchmarks/dpo_step.py --model tiny            # seconds, for a smoke check
    python benchmarks/dpo_step.py --model random:llama-3.2-1b --dtype bfloat16   # on a GPU
    python benchmarks/dpo_step.py --scan-layers --remat full   # the default 8 pairs in 24 GB

(On XLA:CPU `--remat` saves memory only with `--scan-layers`: benchmarks/README.md.)

Prints one JSON object per layout. MFU is against a measured matmul peak of this machine in the
compute dtype (6 or 8 FLOPs per weight per token: see `bench_layout`).
`--dtype bfloat16` computes in bfloat16 with float32 params and optimiser state on both sides
(prefopt-jax `ModelConfig.dtype`; TRL `bf16=True`, torch autocast). With torch, trl and
peft installed (`pip install torch==2.13.0 trl peft`; not project dependencies), TRL's
DPOTrainer runs the same step on the same weights (exported to HF format), pairs and batch size,
side by side. Each configuration runs in its own process, so peak RSS is that configuration's.
prefopt-jax processes set the host allocator as `prefopt` does (prefopt_jax/hostmem.py: freed
memory kept, not page-faulted in again every step); TRL's run with glibc's defaults, as TRL users
get them, unless `--trl-host-malloc keep`. Each row says which (`host_malloc`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak_flops(dtype: str = "float32", n: int | None = None, reps: int = 5,
                      trials: int = 5) -> float:
    """Measured matmul FLOP/s in `dtype`, the best of `trials` (the MFU denominator).

    The best rather than the mean: a single short trial on a shared CPU varies by 2x. bf16
    multiplies the way the model does (`models.matmul`: float32 accumulation), which on CPUs
    with bf16 dot instructions is about twice float32's rate. n x n by n x n products, n 1536 on
    a CPU and 8192 on an accelerator (smaller ones leave a GPU's tensor cores partly idle).
    """
    from prefopt_jax.models.matmul import matmul

    n = n or (1536 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: matmul(x, x))
    f(a).block_until_ready()
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            f(a).block_until_ready()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def logical_tokens(data, batch) -> int:
    """Tokens of the (prompt + completion) sequences of the real pairs, each side counted whole:
    what a padded trainer such as TRL processes, so tokens/s compare across layouts and TRL."""
    pos = {int(e): i for i, e in enumerate(data.example_index_n)}
    total = 0
    for e in np.asarray(batch["example_index"]).reshape(-1):
        if e >= 0:
            i = pos[int(e)]
            total += 2 * int(data.prompt_lengths_n[i]) + int(np.sum(data.completion_lengths_nk[i]))
    return total


def make_data(model, args):
    from prefopt_jax.data.synthetic import synthetic_tokenized
    return synthetic_tokenized(args.examples * (args.steps + 1), seed=0,
                               prompt_median=args.prompt_median,
                               completion_median=args.completion_median,
                               max_length=args.max_length, vocab_size=model.config.vocab_size)


def bench_layout(layout: str, mode: str, args) -> dict:
    """One DPO configuration (layout x full/LoRA) timed over `steps` steps after a warm-up."""
    from flax import nnx

    from prefopt_jax.data import LayoutConfig, Loader
    from prefopt_jax.models import sharding as sharding_lib
    from prefopt_jax.models.lora import LoraConfig
    from prefopt_jax.models.spec import ModelSpec, load_model
    from prefopt_jax.train import build, driver, optim
    from prefopt_jax.train.reference import ReferenceConfig

    spec = ModelSpec(source=args.model, overrides={"remat_policy": args.remat,
                                                   "scan_layers": args.scan_layers},
                     dtype=args.dtype, param_dtype="float32")
    model, _ = load_model(spec)
    data = make_data(model, args)
    layout_config = LayoutConfig(kind=layout, length_step=args.length_step)
    loader = Loader(data, args.examples, layout_config, shuffle=False)
    # own: each batch at its own bucketed shape, as `prefopt train` runs them; agreed: every
    # batch at the largest of them (one compilation).
    shape = driver.agreed_shape(loader, args.steps + 1) if args.shapes == "agreed" else None
    batches = [build.stack_micro([loader.next_batch(min_shape=shape)])
               for _ in range(args.steps + 1)]
    mesh = sharding_lib.make_mesh((1, 1, 1))
    opt = optim.OptimConfig(learning_rate=1e-6, schedule="constant")
    lora = LoraConfig(rank=args.lora_rank) if mode == "lora" else None
    algo = build.AlgoConfig("dpo", (), ReferenceConfig(kind="lora" if lora else "frozen"))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size  # the vocabulary projection (tied or not)
    body = n_params - head * (1 if cfg.tie_word_embeddings else 2)  # less the embedding table
    _, state, step_fn, batch_sh = build.build(model, algo, opt, batches[0], mesh, lora=lora,
                                              logps_chunk=args.chunk, donate=True)
    times, tokens, positions, logical, projected = [], 0, 0, 0, 0
    compiled_temp = None
    with jax.set_mesh(mesh):
        if args.compiled_memory:  # XLA's buffer assignment for the first timed batch's shape
            lowered = step_fn.lower(state, jax.device_put(batches[1], batch_sh))
            compiled_temp = lowered.compile().memory_analysis().temp_size_in_bytes / 2 ** 30
        compiled = set()
        for b in batches:  # warm-up: one untimed step per shape, so no timed step compiles
            signature = tuple((k, v.shape) for k, v in sorted(b.items()))
            if signature not in compiled:
                compiled.add(signature)
                state, metrics = step_fn(state, jax.device_put(b, batch_sh))
                jax.block_until_ready(metrics)
        # The first batch only warms up, as in TRL's timing; --repeats runs the rest again.
        for b in batches[1:] * args.repeats:
            t = time.perf_counter()
            state, metrics = step_fn(state, jax.device_put(b, batch_sh))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
            tokens += int(np.sum(b["segment_ids"] > 0))
            positions += b["tokens"].size
            projected += int(np.sum(b["completion_mask"] > 0))
            logical += logical_tokens(data, {"example_index": b["example_index"][0]})
    seconds = sum(times)
    # Model FLOPs: 2 per weight per token forward. The body's weights act on every real row
    # position, the vocabulary projection only on the completion positions whose log-prob the
    # loss needs (the embedding lookup is no matmul). Full: forward + backward of the policy
    # (6 per weight) + the reference's forward (2). LoRA: no weight-gradient matmuls (4 + 2).
    # Attention's score and value products are left out (a few % at these lengths).
    flops = (8 if mode == "full" else 6) * (body * tokens + head * projected)
    return {"framework": "prefopt-jax", "model": args.model,
            "device": jax.devices()[0].device_kind, "params": n_params, "layout": layout,
            "mode": mode, "dtype": args.dtype,
            "tokens_per_s": logical / seconds, "row_tokens_per_s": tokens / seconds,
            "seconds_per_step": seconds / max(len(times), 1), "steps_timed": len(times),
            "step_seconds": [round(x, 3) for x in times], "shapes": args.shapes,
            "length_step": args.length_step,
            "row_shapes": [list(b["tokens"].shape[1:]) for b in batches[1:]],
            "padding_fraction": 1 - tokens / max(positions, 1),
            "achieved_flops": flops / seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "scan_layers": args.scan_layers, "remat": args.remat,
            **({} if compiled_temp is None else {"compiled_temp_gb": compiled_temp})}


def bench_trl(mode: str, args) -> dict:
    """TRL's DPOTrainer on the same model (exported to HF format), pairs and batch size."""
    import tempfile

    import datasets
    import transformers
    import trl

    from prefopt_jax.models import save_pretrained
    from prefopt_jax.models.spec import ModelSpec, load_model

    model, tokenizer = load_model(ModelSpec(source=args.model))
    data = make_data(model, args)
    tmp = tempfile.mkdtemp()
    save_pretrained(model, tmp, tokenizer)
    import torch
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp)
    hf_tok.pad_token = hf_tok.pad_token or hf_tok.eos_token
    decode = lambda ids: hf_tok.decode(ids)  # noqa: E731
    rows = {"prompt": [decode(data.prompt(i)) for i in range(len(data))],
            "chosen": [decode(data.completion(i, 0)) for i in range(len(data))],
            "rejected": [decode(data.completion(i, 1)) for i in range(len(data))]}
    peft = None
    if mode == "lora":
        import peft as peft_lib
        peft = peft_lib.LoraConfig(r=args.lora_rank, target_modules="all-linear")
    config = trl.DPOConfig(output_dir=tmp, per_device_train_batch_size=args.examples,
                           max_steps=args.steps * args.repeats + 1, learning_rate=1e-6,
                           use_cpu=True,
                           gradient_checkpointing=args.remat != "none",
                           report_to=[], save_strategy="no", logging_steps=1,
                           max_length=args.max_length, dataset_num_proc=1,
                           include_num_input_tokens_seen="non_padding",
                           bf16=args.dtype == "bfloat16")
    timer = StepTimer()
    trainer = trl.DPOTrainer(model=hf, args=config, train_dataset=datasets.Dataset.from_dict(rows),
                             processing_class=hf_tok, peft_config=peft, callbacks=[timer])
    trainer.train()
    seconds = sum(timer.times[1:])
    # TRL re-tokenises the decoded text, so its token counts can differ slightly from ours: count
    # the non-padding tokens its own batches carried (prompt + chosen and prompt + rejected rows).
    tokens = timer.tokens[-1] - timer.tokens[0]
    return {"framework": "trl " + trl.__version__, "layout": "padded", "mode": mode,
            "dtype": args.dtype, "tokens_per_s": tokens / seconds,
            "seconds_per_step": seconds / (len(timer.times) - 1),
            "steps_timed": len(timer.times) - 1,
            "gradient_checkpointing": args.remat != "none",
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


class StepTimer:
    """A transformers callback recording each optimiser step's wall time."""

    def __init__(self):
        import transformers
        self.__class__ = type("StepTimerCallback", (StepTimer, transformers.TrainerCallback), {})
        self.times, self.tokens, self.t = [], [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)
        self.tokens.append(state.num_input_tokens_seen)


def run_one(args) -> dict:
    """One configuration in this process (so peak RSS is its own)."""
    if args.framework == "trl":
        return bench_trl(args.modes, args)
    return bench_layout(args.layouts, args.modes, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a built-in name, a HF directory or .gguf, tiny, or random:NAME (a "
                   "released architecture with random weights, e.g. random:llama-3.2-1b; "
                   "prefopt_jax.models.presets)")
    p.add_argument("--examples", type=int, default=8, help="pairs per batch")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--prompt-median", type=float, default=60)
    p.add_argument("--completion-median", type=float, default=100)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1,
                   help="time the steps this many times over (TRL: as many more steps, its "
                   "data loader reshuffling each epoch); figures are totals over all of them")
    p.add_argument("--shapes", default="own", choices=("own", "agreed"),
                   help="own: each batch at its own bucketed shape, as `prefopt train` runs "
                   "(every shape compiled before timing); agreed: all at the largest")
    p.add_argument("--length-step", type=int, default=None,
                   help="LayoutConfig.length_step: row lengths in multiples of this (packed rows "
                   "chosen per batch) instead of powers of two")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (params and optimiser state stay float32)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--remat", default="none", help="model remat policy, LoRA included (and "
                   "TRL gradient checkpointing when not none)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False,
                   help="ModelConfig.scan_layers: the layers as one scanned (stacked) block")
    p.add_argument("--compiled-memory", action="store_true",
                   help="add compiled_temp_gb: XLA's temp buffers of the step at the first timed "
                   "batch's shape (activations and workspace; params and state not included)")
    p.add_argument("--layouts", default="padded,packed,prefix,prefix_packed")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--frameworks", default="prefopt,trl")
    p.add_argument("--host-malloc", default="auto", choices=("auto", "keep", "default"),
                   help="prefopt-jax processes: prefopt_jax.hostmem setting (auto = as `prefopt` "
                   "does: keep freed memory on CPU-only JAX)")
    p.add_argument("--trl-host-malloc", default="default", choices=("keep", "default"),
                   help="TRL processes: default = glibc as a TRL user runs it")
    p.add_argument("--framework", help=argparse.SUPPRESS)  # internal: run one configuration
    args = p.parse_args()
    if args.framework:
        from prefopt_jax import hostmem

        choice = args.trl_host_malloc if args.framework == "trl" else args.host_malloc
        if choice != "auto":
            os.environ[hostmem.ENV] = choice
        kept = hostmem.keep_freed_memory()
        out = run_one(args)
        out["host_malloc"] = "keep" if kept else "default"
        if "achieved_flops" in out:
            out["matmul_peak_flops"] = matmul_peak_flops(args.dtype)
            out["mfu"] = out["achieved_flops"] / out["matmul_peak_flops"]
        print("RESULT " + json.dumps(out), flush=True)
        return
    for framework, layout, mode in configurations(args):
        cmd = [sys.executable, __file__, *sys.argv[1:], f"--framework={framework}",
               f"--layouts={layout}", f"--modes={mode}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        print(lines[-1][7:] if lines else json.dumps(
            {"framework": framework, "layout": layout, "mode": mode,
             "error": (proc.stderr or proc.stdout)[-800:]}), flush=True)


def configurations(args):
    """(framework, layout, mode) triples; TRL only when it is installed, padded only, and the
    model has a tokenizer (TRL re-tokenises text; tiny and random:NAME models have none)."""
    from prefopt_jax.models import presets

    trl = (importlib.util.find_spec("trl") and args.model != "tiny"
           and not presets.is_random(args.model))
    for mode in args.modes.split(","):
        if "prefopt" in args.frameworks:
            for layout in args.layouts.split(","):
                yield "prefopt", layout, mode
        if "trl" in args.frameworks and trl:
            yield "trl", "padded", mode


if __name__ == "__main__":
    main()

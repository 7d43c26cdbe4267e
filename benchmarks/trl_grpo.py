"""Seconds per GRPO iteration of TRL's GRPOTrainer on CPU, split into generation and update.

    python benchmarks/trl_grpo.py --model-dir /tmp/smollm2_hf --prompts 2 --group-size 4 \
        --max-new-tokens 16

One GRPO iteration is one optimiser step of TRL's `GRPOTrainer` (transformers sampling, no vLLM)
on a generation batch of every prompt x `group_size` completions, used once (mu = 1) in a single
micro-batch, with a reference model whenever beta != 0 (for LoRA, the base model with the adapter
switched off, as TRL does it). A `TrainerCallback` times each optimiser step from
`on_step_begin` to `on_step_end`; a subclass of the trainer times its `_generate` (prompt
tokenisation, `model.generate`, cut at the first EOS, decoding) and counts the prompt and
completion tokens it returns, without padding. TRL samples inside the step (`_prepare_inputs`,
called from `training_step`), so the update time is the step time less the generation time: it
holds the reward calls, the reference and policy forwards, the backward and the optimiser. The
first step is a warm-up and is not timed. Generation tokens/s counts the completion tokens
sampled (EOS included, as in TRL's completion mask); update tokens/s counts prompt + completion
tokens of the batch. With `--dtype bfloat16` (TRL `bf16=True`, torch autocast) the scoring and
loss forwards run in bf16; sampling does too in full fine-tuning, but with LoRA TRL's sampling
calls the PEFT base model's own forward, outside accelerate's autocast, so it runs in float32.
Nothing here is a project dependency: it needs torch, trl (1.16), peft, transformers and
datasets installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time


def bench_trl_grpo(model_dir: str, prompts: list[str], reward_fn, *, group_size: int = 8,
                   max_new_tokens: int = 64, dtype: str = "float32", lora_rank: int | None = None,
                   iterations: int = 2, temperature: float = 1.0, beta: float = 0.04,
                   min_new_tokens: int = 0) -> dict:
    """Run `iterations` GRPO optimiser steps of TRL's GRPOTrainer on CPU; time all but the first.

    Each step samples `group_size` completions of every prompt (`len(prompts) * group_size` rows)
    and takes one optimiser step on all of them. `reward_fn(prompts, completions, **kw)` follows
    TRL's convention. Returns the mean per timed step of the step, generation and update times,
    the two token rates and the process's peak RSS.
    """
    import tempfile

    import datasets
    import torch
    import transformers
    import trl

    if iterations < 2:
        raise ValueError("iterations must be >= 2: the first step is a warm-up and is not timed")
    if group_size < 2:
        raise ValueError("GRPO needs group_size >= 2")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    rows = len(prompts) * group_size

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = None
    if lora_rank is not None:
        import peft
        peft_config = peft.LoraConfig(r=lora_rank, target_modules="all-linear")

    # One generation batch per optimiser step, in one micro-batch. In TRL 1.16 GRPOConfig's
    # __post_init__ sets generation_batch_size = per_device_train_batch_size * num_processes *
    # steps_per_generation (one process here), the sampler draws generation_batch_size //
    # num_generations distinct prompts per generation batch, and _prepare_inputs regenerates
    # every steps_per_generation * num_iterations micro-batches: with a micro-batch of every
    # row, steps_per_generation = gradient_accumulation_steps = num_iterations = 1, each step
    # samples all prompts x group_size afresh and steps once on them (no old-policy forward:
    # gradient_accumulation_steps % generate_every == 0).
    config = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=group_size,
        num_iterations=1,
        max_steps=iterations,
        max_completion_length=max_new_tokens,
        temperature=temperature,
        beta=beta,
        # No EOS before min_new_tokens (transformers' MinNewTokensLengthLogitsProcessor).
        generation_kwargs={"min_new_tokens": min_new_tokens} if min_new_tokens else None,
        use_vllm=False,
        bf16=dtype == "bfloat16",  # TRL's configs default bf16 to True: state it both ways
        gradient_checkpointing=False,  # TRL's configs default it on; off, as in dpo_step.py
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    assert config.generation_batch_size == rows and config.steps_per_generation == 1

    probe = _Probe()
    trainer_cls = _timed_trainer_class(trl.GRPOTrainer, probe)
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward_fn],
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": list(prompts)}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[_step_timer(transformers.TrainerCallback, probe)],
    )
    trainer.train()

    steps = probe.steps
    if len(steps) != iterations:
        raise RuntimeError(f"{len(steps)} optimiser steps recorded, expected {iterations}")
    for i, s in enumerate(steps):
        if s["generate_calls"] != 1 or s["completions"] != rows or s["training_steps"] != 1:
            raise RuntimeError(f"step {i} is not one generation of {rows} completions in one "
                               f"micro-batch: {s}")
    timed = steps[1:]
    mean = lambda key: statistics.fmean(s[key] for s in timed)  # noqa: E731
    step_s, gen_s = mean("seconds"), mean("generation_seconds")
    update_s = statistics.fmean(s["seconds"] - s["generation_seconds"] for s in timed)
    completion_tokens = mean("completion_tokens")
    update_tokens = mean("prompt_tokens") + completion_tokens
    return {
        "framework": "trl " + trl.__version__,
        "dtype": dtype,
        "mode": "lora" if lora_rank is not None else "full",
        "seconds_per_iteration": step_s,
        "generation_seconds": gen_s,
        "update_seconds": update_s,
        "generation_tokens_per_s": completion_tokens / gen_s,
        "update_tokens_per_s": update_tokens / update_s,
        "iterations_timed": len(timed),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        # Context for the figures above (means per timed step).
        "completions_per_iteration": rows,
        "completion_tokens_per_iteration": completion_tokens,
        "update_tokens_per_iteration": update_tokens,
        "scoring_seconds": mean("scoring_seconds"),
    }


class _Probe:
    """Per-step figures, filled by the step callback and the trainer's wrapped methods."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.t0 = 0.0

    def begin(self):
        self.t0 = time.perf_counter()
        self.current = {"seconds": 0.0, "generation_seconds": 0.0, "scoring_seconds": 0.0,
                        "generate_calls": 0, "training_steps": 0, "completions": 0,
                        "prompt_tokens": 0, "completion_tokens": 0}

    def end(self):
        self.current["seconds"] = time.perf_counter() - self.t0
        self.steps.append(self.current)
        self.current = None


def _step_timer(callback_base, probe: _Probe):
    """A TrainerCallback timing each optimiser step (first micro-batch to after optimizer.step)."""

    class StepTimer(callback_base):
        def on_step_begin(self, args, state, control, **kw):
            probe.begin()

        def on_step_end(self, args, state, control, **kw):
            probe.end()

    return StepTimer()


def _timed_trainer_class(base, probe: _Probe):
    """`base` (GRPOTrainer) with its sampling timed and its rows and tokens counted."""

    class TimedGRPOTrainer(base):
        def _generate(self, prompts):
            start = time.perf_counter()
            out = super()._generate(prompts)
            seconds = time.perf_counter() - start
            # (prompt_ids, completion_ids, tool_mask, completions, logprobs, extra, images,
            # tool_images): token ids as unpadded lists; completions cut after the first EOS.
            prompt_ids, completion_ids = out[0], out[1]
            if self.model.training and probe.current is not None:
                c = probe.current
                c["generation_seconds"] += seconds
                c["generate_calls"] += 1
                c["completions"] += len(completion_ids)
                c["prompt_tokens"] += sum(len(ids) for ids in prompt_ids)
                c["completion_tokens"] += sum(len(ids) for ids in completion_ids)
            return out

        def _generate_and_score_completions(self, inputs):
            # Sampling plus rewards, reference log-probs and advantages; the part after
            # sampling is reported as scoring_seconds (it is inside update_seconds).
            start = time.perf_counter()
            generation_before = probe.current["generation_seconds"] if probe.current else 0.0
            out = super()._generate_and_score_completions(inputs)
            if self.model.training and probe.current is not None:
                probe.current["scoring_seconds"] += (time.perf_counter() - start) - (
                    probe.current["generation_seconds"] - generation_before)
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            if probe.current is not None:
                probe.current["training_steps"] += 1
            return super().training_step(model, inputs, num_items_in_batch)

    return TimedGRPOTrainer


def digit_fraction_reward(prompts, completions, **kwargs) -> list[float]:
    """Fraction of a completion's characters that are digits (a cheap TRL-style reward)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def arithmetic_prompts(n: int) -> list[str]:
    """n plain-text prompts asking for a sum."""
    return [f"Question: what is {7 * i + 3} + {11 * i + 5}? Answer with a number.\nAnswer:"
            for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="a Hugging Face model directory")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--iterations", type=int, default=2,
                   help="optimiser steps, the first untimed")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--min-new-tokens", type=int, default=0)
    args = p.parse_args()
    result = bench_trl_grpo(args.model_dir, arithmetic_prompts(args.prompts), digit_fraction_reward,
                            group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                            dtype=args.dtype, lora_rank=args.lora_rank,
                            iterations=args.iterations, temperature=args.temperature,
                            beta=args.beta, min_new_tokens=args.min_new_tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""`prefopt generate`: chat with a model from the command line (chat template applied)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Adds the `generate` sub-command."""
    p = subparsers.add_parser(
        "generate", help="sample replies from a model, chat template applied",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="built-in name, Hugging Face model directory, or .gguf file")
    p.add_argument("--prompt", action="append", required=True,
                   help="user message; repeat the flag for a batch of prompts")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run)


def chat_prompt_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """Token ids of one user turn with the generation prompt, through the chat template."""
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids_of(tokenizer) -> tuple[int, ...]:
    """EOS ids the tokenizer knows of (a chat model's end-of-turn token is its EOS)."""
    ids = tokenizer.eos_token_id
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return tuple(sorted({int(i) for i in ids if i is not None}))


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from prefopt_jax.models import from_pretrained
    from prefopt_jax.sampling.generate import SamplingConfig, generate

    model, tokenizer = from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer files; generate needs one")
    prompts = [chat_prompt_ids(tokenizer, p, args.system) for p in args.prompt]
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, stop_ids=stop_ids_of(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = generate(model, prompts, config, rng=args.seed, pad_id=pad_id)
    for prompt, tokens, n in zip(args.prompt, out.tokens_bn, out.lengths_b):
        reply = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(reply.strip())
    return 0

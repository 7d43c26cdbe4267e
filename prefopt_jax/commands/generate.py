"""`prefopt generate`: chat with a model from the command line (chat template applied).

`--search` picks a search method instead of plain sampling: `beam` (likelihood beam search),
`best_of_n`, `rejection` (RSO) and `value_guided` (VAS: a value head is fitted on the spot to
`--n` samples per prompt scored by `--scorer`, then guides decoding).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Adds the `generate` sub-command."""
    p = subparsers.add_parser(
        "generate", help="sample replies from a model, chat template applied",
        epilog="example: prefopt generate --model runs/mine/export --prompt \"Hi!\" "
               "--temperature 0.7 --top-p 0.9",
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
    _add_search_arguments(p)
    p.set_defaults(func=run)


def _add_search_arguments(p) -> None:
    """The `--search` options (sampling searches use temperature 1 when --temperature is 0)."""
    g = p.add_argument_group("search")
    g.add_argument("--search", default="none",
                   choices=["none", "beam", "best_of_n", "rejection", "value_guided"])
    g.add_argument("--beams", type=int, default=4, help="beam width")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score sum logp / len^alpha")
    g.add_argument("--n", type=int, default=8, help="samples per prompt (best-of-N, RSO, VAS)")
    g.add_argument("--accept", type=int, default=1, help="RSO: samples kept per prompt")
    g.add_argument("--rso-beta", type=float, default=0.5, help="RSO: acceptance temperature")
    g.add_argument("--scorer", default="sentiment", choices=["sentiment", "implicit"],
                   help="sentiment: VADER on the reply; "
                        "implicit: beta log pi/pi_ref against --ref-model")
    g.add_argument("--ref-model", default=None,
                   help="reference model (implicit scorer; beam implicit rewards)")
    g.add_argument("--beta", type=float, default=0.1, help="implicit-reward beta")
    g.add_argument("--vas-beta", type=float, default=1.0, help="VAS: weight of the value bonus")
    g.add_argument("--vas-top-k", type=int, default=20, help="VAS: tokens that get a bonus")
    g.add_argument("--vas-steps", type=int, default=300, help="VAS: value-head training steps")


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
    if args.search != "none":
        replies = _search_replies(args, model, tokenizer, prompts, config, pad_id)
    else:
        out = generate(model, prompts, config, rng=args.seed, pad_id=pad_id)
        replies = [[(tokens[:n], None)] for tokens, n in zip(out.tokens_bn, out.lengths_b)]
    for prompt, rows in zip(args.prompt, replies):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        for tokens, score in rows:
            reply = tokenizer.decode(list(tokens), skip_special_tokens=True).strip()
            print(reply if score is None else f"[{score:.4f}] {reply}")
    return 0


def _scorer(args, model, tokenizer):
    """The `--scorer` as a `scorers` callable."""
    from prefopt_jax.sampling import scorers

    if args.scorer == "sentiment":
        return scorers.sentiment_scorer(tokenizer)
    if args.ref_model is None:
        raise SystemExit("--scorer implicit needs --ref-model")
    return scorers.ImplicitRewardScorer(model, _load_ref(args), beta=args.beta)


def _load_ref(args):
    import jax.numpy as jnp

    from prefopt_jax.models import from_pretrained

    return from_pretrained(args.ref_model, dtype=getattr(jnp, args.dtype))[0]


def _search_replies(args, model, tokenizer, prompts, config, pad_id):
    """Per prompt, a list of `(tokens, score)` from the `--search` method."""
    import dataclasses

    import numpy as np
    from flax import nnx

    from prefopt_jax.models.heads import ValueHead
    from prefopt_jax.sampling import search, value

    if args.search == "beam":
        beam = search.BeamConfig(args.beams, args.max_new_tokens, args.length_penalty,
                                 config.stop_ids)
        ref = _load_ref(args) if args.ref_model else None
        out = search.beam_search(model, prompts, beam, ref_model=ref, beta=args.beta,
                                 pad_id=pad_id)
        scores = out.scores_bw if out.rewards_bw is None else out.rewards_bw
        return [[(out.tokens_bwc[b, 0, :out.lengths_bw[b, 0]], scores[b, 0])]
                for b in range(len(prompts))]
    config = dataclasses.replace(config, temperature=config.temperature or 1.0)
    scorer = _scorer(args, model, tokenizer)
    if args.search in ("best_of_n", "rejection"):
        if args.search == "best_of_n":
            sel = search.best_of_n(model, prompts, scorer, args.n, config, args.seed, pad_id)
        else:
            sel = search.rejection_sample(model, prompts, scorer, args.n, args.accept, config,
                                          args.rso_beta, args.seed, pad_id)
        scores_bk = np.take_along_axis(sel.scores_bn, sel.index_bk, axis=1)
        return [[(t[m > 0], s) for t, m, s in zip(sel.tokens_bkc[b], sel.mask_bkc[b], scores_bk[b])]
                for b in range(len(prompts))]
    cands = search.sample_candidates(model, prompts, args.n, config, args.seed, pad_id)
    head = ValueHead(model.config.hidden_size, init_scale=0.1, rngs=nnx.Rngs(args.seed))
    value.train_value_head(model, head, cands, scorer(cands), steps=args.vas_steps)
    out = search.value_guided_generate(model, head, prompts, config, beta=args.vas_beta,
                                       top_k=args.vas_top_k, rng=args.seed + 1, pad_id=pad_id)
    return [[(t[:n], None)] for t, n in zip(out.tokens_bn, out.lengths_b)]

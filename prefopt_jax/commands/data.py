"""`prefopt data inspect`: what a dataset looks like to prefopt-jax before any training.

`prefopt data build-pairs`: sample k replies per prompt from a policy, score them (VADER, a
reward model or an ensemble), and write preference pairs as JSONL ready for `prefopt train`.
"""

from __future__ import annotations

import argparse
import dataclasses

SHOWN_CHARS = 160


def register(subparsers) -> None:
    """Adds the `data` command and its `inspect` sub-command."""
    data = subparsers.add_parser(
        "data", help="inspect preference datasets",
        epilog="example: prefopt data inspect my_prefs.jsonl --model smollm2-135m-instruct")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser(
        "inspect", help="format, lengths, truncation and padding per layout of a dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="json/jsonl/parquet/csv file, saved dataset or folder, "
                   "tfds:NAME, or a hub name")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="tokenizer: built-in name, model folder, .gguf file or hub name")
    p.add_argument("--split", default="train")
    p.add_argument("--format", default=None, help="skip detection (see data.FORMATS)")
    p.add_argument("--ranked", default="best_vs_worst",
                   choices=["best_vs_worst", "all_pairs", "best_vs_random", "listwise"])
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--max-completion-length", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--prompt-truncation", default="error",
                   choices=["error", "keep_start", "keep_end", "drop"])
    p.add_argument("--completion-truncation", default="keep_start",
                   choices=["keep_start", "drop", "error"])
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip and count bad rows instead of stopping at the first")
    p.add_argument("--rows", type=int, default=3, help="examples to print")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch for layouts")
    p.add_argument("--row-length", type=int, default=None, help="packed row length")
    p.add_argument("--length-step", type=int, default=None,
                   help="row lengths in multiples of this, packed rows chosen per batch "
                   "(LayoutConfig.length_step); default powers of two")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.set_defaults(func=run)
    add_build_pairs(sub)


def run(args: argparse.Namespace) -> int:
    """Reads, validates and tokenises the source, then prints what it found."""
    from prefopt_jax import data as D

    config = D.DataConfig(
        split=args.split, format=args.format, ranked=args.ranked,
        max_prompt_length=args.max_prompt_length, max_completion_length=args.max_completion_length,
        max_length=args.max_length, prompt_truncation=args.prompt_truncation,
        completion_truncation=args.completion_truncation, skip_bad_rows=args.skip_bad_rows)
    if args.no_cache:
        config = dataclasses.replace(config, cache_dir=None)
    tokenizer = D.load_tokenizer(args.model)
    try:
        data, report = D.prepare(args.source, tokenizer, config)
    except D.DataError as err:
        print(f"bad input: {err}\n(--skip-bad-rows skips such rows and counts them)")
        return 1
    print(report.summary())
    print_examples(data, tokenizer, args.rows)
    print_histograms(data)
    print_layouts(data, args.batch_size, args.row_length, args.length_step)
    return 0


def shorten(text: str) -> str:
    """repr of a text, its middle cut out when long."""
    text = repr(text)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS // 2] + " ... " + text[
        -SHOWN_CHARS // 2:]


def print_examples(data, tokenizer, n: int) -> None:
    """The first examples, decoded with special tokens, prompt and completions apart."""
    from prefopt_jax.data.tokenized import side_names

    names = side_names(data.kind, data.num_completions)
    for i in range(min(n, len(data))):
        print(f"\nexample {i} (row {data.example_index_n[i]}):")
        print(f"  prompt     [{len(data.prompt(i)):>5} tokens] "
              f"{shorten(tokenizer.decode(list(data.prompt(i))))}")
        for j, name in enumerate(names):
            tokens = data.completion(i, j)
            text = shorten(tokenizer.decode(list(tokens)))
            print(f"  {name:<10} [{len(tokens):>5} tokens] {text}")
        extra = {k: v[i].tolist() for k, v in data.fields.items()}
        if extra:
            print(f"  fields     {extra}")


def print_histograms(data) -> None:
    """Length histograms (tokens) per field."""
    from prefopt_jax.data.stats import field_lengths, histogram_lines, length_summary

    for name, lengths in field_lengths(data).items():
        print(f"\n{name} length (tokens): {length_summary(lengths)}")
        print("\n".join(histogram_lines(lengths)))


def print_layouts(data, batch_size: int, row_length: int | None,
                  length_step: int | None = None) -> None:
    """Padding fraction and real tokens per row of each layout over one epoch."""
    from prefopt_jax.data import LAYOUTS, LayoutConfig
    from prefopt_jax.data.stats import layout_figures

    print(f"\nlayouts (batch of {batch_size} examples, one epoch of {len(data)} examples):")
    print(f"  {'layout':<14}{'padding':>9}{'tokens/row':>12}{'rows/batch':>12}"
          f"{'row length':>12}{'shapes':>8}")
    for kind in LAYOUTS:
        layout = LayoutConfig(kind=kind, row_length=row_length, length_step=length_step)
        f = layout_figures(data, batch_size, layout)
        print(f"  {kind:<14}{f.padding_fraction:>9.3f}{f.tokens_per_row:>12.1f}"
              f"{f.rows_per_batch:>12.1f}{f.row_length:>12.1f}{f.shapes:>8}")


def add_build_pairs(sub) -> None:
    """Adds `data build-pairs`."""
    p = sub.add_parser("build-pairs", help="sample, score and pair replies into a preference "
                       "JSONL file", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", help="file or dataset with a 'prompt' column (text or messages)")
    p.add_argument("--out", required=True, help="output .jsonl")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="policy: built-in name, model folder or .gguf file")
    p.add_argument("--scorer", default="sentiment",
                   help="sentiment | length | rm:DIR | ensemble:DIR1,DIR2,...")
    p.add_argument("--aggregate", default="mean", choices=["mean", "wco", "uwo"])
    p.add_argument("--uwo-lambda", type=float, default=0.5)
    p.add_argument("--k", type=int, default=4, help="replies sampled per prompt")
    p.add_argument("--pairs", default="best_vs_worst",
                   choices=["best_vs_worst", "all_pairs", "rso"])
    p.add_argument("--accept", type=int, default=2, help="rso: replies accepted per prompt")
    p.add_argument("--rso-beta", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="first N prompts only")
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts sampled at a time")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_build_pairs)


def run_build_pairs(args: argparse.Namespace) -> int:
    """Sample, score, select and write the pairs; prints a one-line summary."""
    from prefopt_jax.rewards import scorers as rm_scorers
    from prefopt_jax.sampling import onpolicy
    from prefopt_jax.models import from_pretrained
    from prefopt_jax.sampling.generate import SamplingConfig

    model, tokenizer = from_pretrained(args.model)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer files; build-pairs needs one")
    scorer = rm_scorers.from_spec(args.scorer, tokenizer, args.aggregate, args.uwo_lambda)
    eos = tokenizer.eos_token_id
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, stop_ids=() if eos is None else (int(eos),))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = onpolicy.read_prompts(args.prompts, args.limit)
    rows = []
    for start in range(0, len(prompts), args.batch_prompts):
        chunk = prompts[start:start + args.batch_prompts]
        ids = [onpolicy.prompt_ids(tokenizer, p) for p in chunk]
        scored = onpolicy.sample_and_score(
            model, ids, scorer, args.k, config, mode=args.pairs, accept=args.accept,
            rso_beta=args.rso_beta, seed=args.seed + start, pad_id=pad_id)
        rows += onpolicy.to_rows(scored, chunk, tokenizer)
    onpolicy.write_jsonl(rows, args.out)
    print(f"{len(rows)} pairs from {len(prompts)} prompts x {args.k} replies "
          f"({args.pairs}, scorer {args.scorer}) -> {args.out}")
    return 0

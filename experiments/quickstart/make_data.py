"""Builds the quickstart preference set: on-policy SmolLM2 replies ranked by a sentiment analyser.

For each prompt asking for a short review or opinion, SmolLM2-135M-Instruct samples two replies; the
VADER compound score (a real, rule-based sentiment analyser from PyPI) decides which reply is chosen,
so the preference is "more positive replies". Pairs whose scores differ by less than `--min-gap` are
left out (and counted), since they carry no preference. Held-out prompts use subjects that never
appear in training.

    python experiments/quickstart/make_data.py --out experiments/quickstart/data

writes `train.jsonl` and `heldout.jsonl` in the conversational paired format
(`prompt`, `chosen`, `rejected` as message lists, plus `score_chosen`, `score_rejected`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib

TEMPLATES = (
    "Write a two-sentence review of {}.",
    "In one or two sentences, what do you think of {}?",
    "Give a short opinion about {}.",
    "Describe {} in two sentences, as a customer review.",
)
SUBJECTS = (
    "a small coffee shop downtown", "a budget smartphone", "a rainy weekend", "a city bus ride",
    "a public library", "a frozen pizza", "a science fiction movie", "a pair of running shoes",
    "a hotel near the airport", "a cooking class", "a used bicycle", "an online chess app",
    "a museum of modern art", "a train journey", "a noisy apartment", "a new video game",
    "a second-hand novel", "a music festival", "a gym membership", "a mountain hike",
    "a fast food burger", "a laptop keyboard", "a dentist appointment", "a summer job",
    "a history podcast", "a theme park", "a houseplant", "a winter coat", "a group project",
    "a language learning app", "a farmers market", "a late-night taxi", "a board game night",
    "an electric scooter", "a camping tent", "a yoga class", "a vegetarian restaurant",
    "a car rental company", "a local newspaper", "a cheap umbrella",
)
HELDOUT_SUBJECTS = (
    "a bakery on the corner", "a wireless headset", "a seaside town", "a tax form",
    "a jazz concert", "an office chair", "a ferry crossing", "a hardware store",
    "a children's cartoon", "a snowy morning", "a food delivery app", "a botanical garden",
)


def prompts_for(subjects) -> list[str]:
    """Every template applied to every subject."""
    return [t.format(s) for s, t in itertools.product(subjects, TEMPLATES)]


def sample_pairs(model, tokenizer, prompts, seed, batch_size, max_new_tokens, temperature):
    """Samples two replies per prompt with prefopt-jax's own jitted sampler."""
    from prefopt_jax.commands.generate import chat_prompt_ids, stop_ids_of
    from prefopt_jax.sampling.generate import SamplingConfig, generate

    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                            stop_ids=stop_ids_of(tokenizer))
    rows = [chat_prompt_ids(tokenizer, p) for p in prompts for _ in range(2)]
    replies = []
    for start in range(0, len(rows), batch_size):
        out = generate(model, rows[start:start + batch_size], config, rng=seed + start)
        for tokens, n in zip(out.tokens_bn, out.lengths_b):
            replies.append(tokenizer.decode(tokens[:n], skip_special_tokens=True).strip())
        print(f"sampled {len(replies)}/{len(rows)} replies", flush=True)
    return [(replies[2 * i], replies[2 * i + 1]) for i in range(len(prompts))]


def to_rows(prompts, pairs, min_gap):
    """Ranks each pair by VADER compound sentiment; drops near-ties (counted, not silent)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyser = SentimentIntensityAnalyzer()
    rows, ties = [], 0
    for prompt, (a, b) in zip(prompts, pairs):
        sa, sb = (analyser.polarity_scores(r)["compound"] for r in (a, b))
        if abs(sa - sb) < min_gap or not a or not b:
            ties += 1
            continue
        (chosen, sc), (rejected, sr) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "score_chosen": sc, "score_rejected": sr,
        })
    return rows, ties


def write_split(model, tokenizer, prompts, seed, args, path: pathlib.Path) -> None:
    """Samples two replies per prompt, ranks them (`to_rows`) and writes the pairs as JSONL."""
    pairs = sample_pairs(model, tokenizer, prompts, seed, args.batch_size, args.max_new_tokens,
                         args.temperature)
    rows, ties = to_rows(prompts, pairs, args.min_gap)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{path.stem}: {len(rows)} pairs written, {ties} near-ties left out")


def sampling_parser(description: str, out: str, seed: int) -> argparse.ArgumentParser:
    """The options of a script that samples and ranks pairs (this one and its reuses)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=out)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--min-gap", type=float, default=0.05)
    return parser


def main() -> None:
    from prefopt_jax import hostmem

    hostmem.keep_freed_memory()  # before JAX starts (see prefopt_jax/hostmem.py)
    args = sampling_parser(__doc__.splitlines()[0], "experiments/quickstart/data", 0).parse_args()

    from prefopt_jax.models import from_pretrained

    model, tokenizer = from_pretrained(args.model)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, subjects, seed in (("train", SUBJECTS, args.seed), ("heldout", HELDOUT_SUBJECTS, args.seed + 10**6)):
        write_split(model, tokenizer, prompts_for(subjects), seed, args, out / f"{name}.jsonl")


if __name__ == "__main__":
    main()

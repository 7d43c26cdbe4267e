"""Search for positive sentiment on SmolLM2-135M-Instruct: sampling vs best-of-N vs beam search.

For 16 review prompts, the mean VADER compound sentiment (prefopt_jax.rewards.sentiment) of:
plain sampling (temperature 1, all N samples), best-of-N over those same samples with the
sentiment scorer, greedy decoding, and likelihood beam search (the top beam). With `--policy`
and `--ref`, also the implicit-reward best-of-N of a DPO policy against its reference.

    python experiments/search_sentiment/run.py            # prints the table as markdown and JSON
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SUBJECTS = (
    "a small coffee shop downtown", "a budget smartphone", "a rainy weekend", "a city bus ride",
    "a public library", "a frozen pizza", "a science fiction movie", "a pair of running shoes",
    "a hotel near the airport", "a cooking class", "a used bicycle", "an online chess app",
    "a museum of modern art", "a train journey", "a noisy apartment", "a new video game",
)


def main() -> None:
    from prefopt_jax import hostmem

    hostmem.keep_freed_memory()  # before JAX starts (see prefopt_jax/hostmem.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default=None,
                   help="an exported DPO policy (e.g. RUN/export) searched instead of --model; "
                        "--model is then its reference and the implicit-reward best-of-N is added")
    p.add_argument("--beta", type=float, default=0.1, help="implicit-reward beta")
    args = p.parse_args()

    from prefopt_jax.commands.generate import chat_prompt_ids, stop_ids_of
    from prefopt_jax.evals import metrics
    from prefopt_jax.models import from_pretrained
    from prefopt_jax.sampling import scorers, search
    from prefopt_jax.sampling.generate import SamplingConfig, generate

    model, tok = from_pretrained(args.model)
    ref = None
    if args.policy:
        ref, (model, _) = model, from_pretrained(args.policy, load_tokenizer=False)
    prompts = [chat_prompt_ids(tok, f"Write a two-sentence review of {s}.") for s in SUBJECTS]
    stops, pad = stop_ids_of(tok), tok.pad_token_id or 0
    sentiment = scorers.sentiment_scorer(tok)
    rows = {}

    def record(name, tokens_bkc, mask_bkc, seconds):
        cands = scorers.Candidates(prompts, tokens_bkc, mask_bkc)
        rows[name] = {"sentiment": float(sentiment(cands).mean()),
                      "length": metrics.length_stats(np.asarray(mask_bkc).sum(-1).ravel())["mean"],
                      "seconds": round(seconds, 1)}

    t0 = time.time()
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, stop_ids=stops)
    sel = search.best_of_n(model, prompts, sentiment, args.n, config, rng=args.seed, pad_id=pad)
    seconds = time.time() - t0
    record(f"sampling (T=1, all {args.n} samples)", sel.candidates.tokens_bnc,
           sel.candidates.mask_bnc, seconds)
    record(f"best-of-{args.n} (VADER scorer)", sel.tokens_bkc, sel.mask_bkc, seconds)
    if ref is not None:
        implicit = scorers.ImplicitRewardScorer(model, ref, args.beta)(sel.candidates)
        index_b1 = search.best_of_n_select(implicit)[:, None]
        take = lambda x: np.take_along_axis(x, index_b1[..., None], axis=1)  # noqa: E731
        record(f"best-of-{args.n} (implicit reward)", take(sel.candidates.tokens_bnc),
               take(sel.candidates.mask_bnc), time.time() - t0)
    t0 = time.time()
    greedy = generate(model, prompts, SamplingConfig(args.max_new_tokens, 0.0, stop_ids=stops),
                      pad_id=pad)
    record("greedy", greedy.tokens_bn[:, None], greedy.mask_bn[:, None], time.time() - t0)
    t0 = time.time()
    beams = search.beam_search(model, prompts, search.BeamConfig(
        args.beams, args.max_new_tokens, 1.0, stops), pad_id=pad)
    record(f"beam search ({args.beams} beams, top beam)", beams.tokens_bwc[:, :1],
           beams.mask_bwc[:, :1], time.time() - t0)

    print("| method | mean VADER compound | mean length (tokens) | wall s |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['sentiment']:+.3f} | {r['length']:.1f} | {r['seconds']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

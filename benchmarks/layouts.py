"""Padding fraction and real tokens per row of each batch layout on a realistic length mix.

Lengths are log-normal (long-tailed), like prompts and responses of real preference datasets
(medians about 120 and 220 tokens, a tail past 1k), drawn with a fixed seed and capped as a
truncating tokenizer would (prompts to half of max_length, sequences to max_length).

    python benchmarks/layouts.py [--num-examples 4096] [--batch-size 32] [--max-length 2048]

Prints one JSON object per line: the length mix, then one per layout.
"""

from __future__ import annotations

import argparse
import json

from prefopt_jax.data import LAYOUTS, LayoutConfig
from prefopt_jax.data.stats import field_lengths, layout_figures, length_summary
from prefopt_jax.data.synthetic import synthetic_tokenized


def main() -> None:
    """Draws the length mix and prints the figures of each layout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per batch")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--prompt-median", type=float, default=120.0)
    parser.add_argument("--completion-median", type=float, default=220.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length-step", type=int, default=None,
                        help="LayoutConfig.length_step (default: power-of-two lengths)")
    args = parser.parse_args()
    data = synthetic_tokenized(args.num_examples, seed=args.seed, prompt_median=args.prompt_median,
                               completion_median=args.completion_median,
                               max_length=args.max_length)
    lengths = {name: length_summary(v) for name, v in field_lengths(data).items()}
    print(json.dumps({"lengths": lengths, "examples": len(data), "batch_size": args.batch_size}))
    for kind in LAYOUTS:
        layout = LayoutConfig(kind=kind, length_step=args.length_step)
        figures = layout_figures(data, args.batch_size, layout)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                          for k, v in figures.__dict__.items()}))


if __name__ == "__main__":
    main()

"""Larger held-out sets for the sentiment reward model: in-distribution and shifted.

The quickstart's held-out file has 41 pairs, too few to tell a reward model from chance with
confidence. This script samples more on-policy SmolLM2 pairs, ranked by VADER exactly as the
quickstart's `make_data.py` does (its functions are reused), on subjects that appear in neither
quickstart split:

- `heldout_in.jsonl`: the quickstart's four prompt templates (in-distribution prompts);
- `heldout_shifted.jsonl`: four new prompt styles (tweets, pros/cons, a note to a friend, a
  product blurb) on the same new subjects, so prompts and reply styles move away from training.

    python experiments/reward_model_sentiment/make_data.py --out experiments/reward_model_sentiment/data
"""

from __future__ import annotations

import itertools
import os
import pathlib
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "quickstart"))

import make_data as quickstart  # noqa: E402  (experiments/ is not an installed package)

SUBJECTS = (
    "a hair salon", "a kitchen blender", "a city park", "a parking garage", "a poetry reading",
    "a rental scooter", "a hiking backpack", "a sushi bar", "a phone carrier", "a math textbook",
    "a bowling alley", "a cruise ship", "a thrift store", "a smart watch", "a cable TV package",
    "a pottery workshop", "a night train", "a coworking space", "a vending machine",
    "a karaoke bar", "a desk lamp", "a ski resort", "a weather app", "an airport lounge",
    "a street food stall", "a comedy show", "a bookshop cafe", "a car wash", "a dog park",
    "a printer",
)
SHIFTED_TEMPLATES = (
    "Write a tweet about {}.",
    "List one good thing and one bad thing about {}.",
    "Tell a friend about {} in a short message.",
    "Write a one-line product blurb for {}.",
)


def main() -> None:
    from prefopt_jax import hostmem

    hostmem.keep_freed_memory()  # before JAX starts (see prefopt_jax/hostmem.py)
    args = quickstart.sampling_parser(__doc__.splitlines()[0],
                                      "experiments/reward_model_sentiment/data", 2).parse_args()

    from prefopt_jax.models import from_pretrained

    model, tokenizer = from_pretrained(args.model)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = (("heldout_in", quickstart.TEMPLATES, args.seed),
              ("heldout_shifted", SHIFTED_TEMPLATES, args.seed + 1))
    for name, templates, seed in splits:
        prompts = [t.format(s) for s, t in itertools.product(SUBJECTS, templates)]
        quickstart.write_split(model, tokenizer, prompts, seed, args, out / f"{name}.jsonl")


if __name__ == "__main__":
    main()

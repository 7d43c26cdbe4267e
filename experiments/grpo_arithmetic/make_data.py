"""Arithmetic word problems with their answers: train and held-out prompts, disjoint.

    python experiments/grpo_arithmetic/make_data.py [--train 256] [--heldout 64] [--seed 0]

Writes `data/train.jsonl` and `data/heldout.jsonl`, one problem per line:
`{"prompt": [{"role": "user", "content": ...}], "answer": "19"}`. Each problem is a template
(a story with one addition or subtraction of small whole numbers: SmolLM2-135M's sampled
replies solve about one in twenty, enough signal for a group of 8) filled with numbers; a held-out
problem never repeats a train problem's (template, numbers), and the two sets are drawn from
disjoint number pairs, so held-out accuracy measures arithmetic, not recall.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTION = "Reply with the number only."
# (story, answer) with a, b (and c) filled in; answers stay whole and non-negative.
TEMPLATES = [
    ("{n} has {a} apples and buys {b} more. How many apples does {n} have now?",
     lambda a, b: a + b),
    ("{n} had {a} stickers and gave {b} of them away. How many stickers are left?",
     lambda a, b: a - b),
    ("{n} reads {a} pages on Monday and {b} pages on Tuesday. How many pages in total?",
     lambda a, b: a + b),
    ("There are {a} birds on a tree and {b} fly away. How many birds are on the tree now?",
     lambda a, b: a - b),
]
NAMES = ["Tom", "Ana", "Lee", "Maya", "Sam", "Noor", "Ivan", "Zoe"]


def draw(rng, count: int, taken: set, number_pairs: set) -> list[dict]:
    """`count` new problems whose (a, b) pair is in `number_pairs` and not yet `taken`."""
    rows = []
    while len(rows) < count:
        t = int(rng.integers(len(TEMPLATES)))
        a, b = int(rng.integers(2, 21)), int(rng.integers(1, 10))
        if (a, b) not in number_pairs or (t, a, b) in taken or b >= a:
            continue
        taken.add((t, a, b))
        story, answer = TEMPLATES[t]
        text = story.format(n=NAMES[int(rng.integers(len(NAMES)))], a=a, b=b)
        rows.append({"prompt": [{"role": "user", "content": f"{text} {INSTRUCTION}"}],
                     "answer": str(answer(a, b))})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--heldout", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    pairs = [(a, b) for a in range(2, 21) for b in range(1, 10) if b < a]
    order = rng.permutation(len(pairs))
    cut = len(pairs) * 4 // 5  # number pairs: 80% for train, 20% held out
    train_pairs = {pairs[i] for i in order[:cut]}
    heldout_pairs = {pairs[i] for i in order[cut:]}
    taken: set = set()
    os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
    for name, count, allowed in (("train", args.train, train_pairs),
                                 ("heldout", args.heldout, heldout_pairs)):
        rows = draw(rng, count, taken, allowed)
        with open(os.path.join(HERE, "data", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{name}: {len(rows)} problems", flush=True)


if __name__ == "__main__":
    main()

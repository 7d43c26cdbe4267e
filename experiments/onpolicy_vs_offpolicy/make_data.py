"""Off-policy pairs for the quickstart's prompts: two replies from a templated writer,
ranked by VADER.

    python experiments/onpolicy_vs_offpolicy/make_data.py

For each of the 147 prompts of `experiments/quickstart/data/train.jsonl` (whose pairs SmolLM2
sampled itself), a seeded writer fills two sentences from fixed templates with an opener, an
adjective (drawn from positive, neutral and negative words), a detail and a closer about the
prompt's subject. The two replies are ranked by VADER's compound score exactly as the
quickstart's are (`quickstart/make_data.py:to_rows`); a near-tie is redrawn, so every prompt keeps
one pair. The replies are fluent but are not what SmolLM2 writes: the pairs are off-policy.
Writes `data/train.jsonl` beside this file (the same format and fields as the quickstart's).
"""

from __future__ import annotations

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "experiments", "quickstart"))

import make_data as quickstart  # noqa: E402  (the quickstart's data script: subjects, ranking)

OPENERS = ("I tried {s} last week.", "My experience with {s} was memorable.",
           "I have an opinion about {s}.", "Here is my take on {s}.")
ADJECTIVES = ("wonderful", "delightful", "excellent", "pleasant", "fine", "ordinary", "average",
              "disappointing", "awful", "terrible", "boring", "decent", "great", "bad")
DETAILS = ("The staff and the details felt {a}.", "Overall it was {a} from start to finish.",
           "Honestly, the whole thing was {a}.", "Most of it struck me as {a}.")
CLOSERS = ("I would go back.", "I would not recommend it.", "It is worth a look.",
           "I expected more.", "")


def subject_of(prompt: str) -> str:
    """The quickstart subject a prompt names."""
    return next(s for s in quickstart.SUBJECTS if s in prompt)


def write_reply(rng: random.Random, subject: str) -> str:
    """One templated two-to-three sentence reply about the subject."""
    text = " ".join([rng.choice(OPENERS).format(s=subject),
                     rng.choice(DETAILS).format(a=rng.choice(ADJECTIVES)), rng.choice(CLOSERS)])
    return text.strip()


def main(seed: int = 0, min_gap: float = 0.05, out: str = os.path.join(HERE, "data")) -> None:
    with open(os.path.join(ROOT, "experiments/quickstart/data/train.jsonl")) as f:
        prompts = [json.loads(line)["prompt"][0]["content"] for line in f if line.strip()]
    rng = random.Random(seed)
    rows, redraws = [], 0
    for prompt in prompts:
        while True:
            pair = (write_reply(rng, subject_of(prompt)), write_reply(rng, subject_of(prompt)))
            ranked, _ = quickstart.to_rows([prompt], [pair], min_gap)
            if ranked:
                rows += ranked
                break
            redraws += 1
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} off-policy pairs written ({redraws} near-ties redrawn)")


if __name__ == "__main__":
    main()

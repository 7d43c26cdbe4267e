"""VADER sentiment as a ground-truth reward: the compound score of each text, in [-1, 1].

VADER (vaderSentiment on PyPI) is a rule-based analyser: deterministic, CPU-only and fast, so it
can score every sampled reply of an experiment without a second model.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


@functools.lru_cache(maxsize=1)
def analyser():
    """One shared SentimentIntensityAnalyzer (building it reads the lexicon from disk)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def compound(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment of each text (-1 most negative, +1 most positive; "" is 0)."""
    return np.asarray([analyser().polarity_scores(t)["compound"] for t in texts], np.float32)

"""Objectives library: arrays in, arrays out. `get(name)` returns a registered loss."""

from prefopt_jax.losses import pairwise  # noqa: F401  (registers its losses)
from prefopt_jax.losses.base import (ListwiseInputs, LossOutput, PairLogps, PairwiseInputs,
                                     UnpairedInputs, mean_loss, metric_values, pair_logps,
                                     seq_reduce)
from prefopt_jax.losses.registry import UnknownLossError, get, names, register

__all__ = [
    "ListwiseInputs", "LossOutput", "PairLogps", "PairwiseInputs", "UnpairedInputs",
    "UnknownLossError", "get", "mean_loss", "metric_values", "names", "pair_logps", "register",
    "seq_reduce",
]

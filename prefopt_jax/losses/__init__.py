"""Objectives library: arrays in, arrays out. `get(name)` returns a registered loss.

Importing this package registers every objective (pairwise, unpaired, listwise, reward-model,
token-level, online RL) and the `mpo` mixture; modifiers live in `prefopt_jax.losses.modifiers`.
"""

from prefopt_jax.losses import (listwise, modifiers, pairwise, rewards,  # noqa: F401 (register)
                                rl, tokenlevel, unpaired)
from prefopt_jax.losses.base import (DistillInputs, ListwiseInputs, LossOutput, PairLogps,
                                     PairwiseInputs, RewardPairInputs, RolloutInputs,
                                     UnpairedInputs,
                                     listwise_from_flat, mean_loss, metric_values, pair_logps,
                                     pairwise_from_interleaved, seq_reduce)
from prefopt_jax.losses.modifiers import f_divergence, ld_dpo, mix, reference_free, wpo
from prefopt_jax.losses.registry import LossInfo, UnknownLossError, get, info, names, register

__all__ = [
    "DistillInputs", "ListwiseInputs", "LossInfo", "LossOutput", "PairLogps", "PairwiseInputs",
    "RewardPairInputs", "RolloutInputs", "UnknownLossError", "UnpairedInputs", "f_divergence",
    "get", "info", "ld_dpo", "listwise_from_flat", "mean_loss", "metric_values", "mix", "names",
    "pair_logps", "pairwise_from_interleaved", "reference_free", "register", "seq_reduce", "wpo",
]

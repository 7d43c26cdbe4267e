"""Objectives library: arrays in, arrays out. `get(name)` returns a registered loss, `info(name)`
its declaration (inputs, reference, coupling, needs, paper), `compose(...)` an objective as a
config names it (a loss or a mix, with modifiers).

Importing this package registers every objective (pairwise, unpaired, listwise, reward-model,
token-level, online RL, diffusion) and the `mpo` mixture. docs/objectives.md lists them all.
"""

from prefopt_jax.losses import (diffusion, listwise, modifiers, pairwise,  # noqa: F401
                                rewards, rl, tokenlevel, unpaired)
from prefopt_jax.losses.base import (DistillInputs, ListwiseInputs, LossOutput, PairLogps,
                                     PairwiseInputs, RewardPairInputs, RolloutInputs,
                                     UnpairedInputs,
                                     listwise_from_flat, mean_loss, metric_values, pair_logps,
                                     pairwise_from_interleaved, seq_reduce)
from prefopt_jax.losses.modifiers import MODIFIERS, f_divergence, ld_dpo, mix, reference_free, wpo
from prefopt_jax.losses.objective import Objective, compose
from prefopt_jax.losses.registry import (DIFFUSION_INPUTS, INPUTS, NEEDS, LossInfo,
                                         ObjectiveError, UnknownLossError, get, hyper_defaults,
                                         info, names, register)

__all__ = [
    "DIFFUSION_INPUTS", "DistillInputs", "INPUTS", "ListwiseInputs", "LossInfo", "LossOutput",
    "MODIFIERS", "NEEDS",
    "Objective", "ObjectiveError", "PairLogps", "PairwiseInputs", "RewardPairInputs",
    "RolloutInputs", "UnknownLossError", "UnpairedInputs", "compose", "f_divergence", "get",
    "hyper_defaults", "info", "ld_dpo", "listwise_from_flat", "mean_loss", "metric_values", "mix",
    "names", "pair_logps", "pairwise_from_interleaved", "reference_free", "register",
    "seq_reduce", "wpo",
]

"""Objectives by name: `register(name)` decorates, `get(name)` looks up.

Names are the registry names of /work/shared/ALGORITHMS.md. Selection happens by name in configs,
never through `if name == ...` chains.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

_REGISTRY: dict[str, Callable] = {}


class UnknownLossError(KeyError):
    """An objective name that is not registered; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering `fn` under `name`; registering a name twice is an error."""
    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = fn
        return fn

    return deco


def get(name: str) -> Callable:
    """The objective registered as `name`; unknown names raise UnknownLossError listing all."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownLossError(f"unknown loss {name!r}; known losses: {known}") from None


def names() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


# Objectives whose formula has no reference term (ALGORITHMS.md "ref" column says no).
REFERENCE_FREE = frozenset({"slic", "sft", "simpo", "cpo", "orpo", "tpo", "tpo_l",
                            "bradley_terry", "ensemble_mean", "wco", "uwo", "par"})
# Objectives whose formula couples examples across the whole batch (sorts, batch means).
BATCH_COUPLED = frozenset({"aot", "aot_unpaired", "kto", "bco", "bco_pair", "mpo"})
# Objectives that read mismatched completions (the inputs' `kl_*` fields: example i+1's
# completion under prompt i), unless the named hyperparameter is given in their place.
MISMATCHED = {"kto": "z0"}


@dataclasses.dataclass(frozen=True)
class LossInfo:
    """What the engine must know about an objective before building a step.

    Attributes:
      kind: the inputs type it reads: "pairwise", "unpaired", "listwise", "reward", "distill",
        "rollout" (from the annotation of its `inputs` parameter).
      needs_reference: whether reference log-probs enter the formula.
      batch_coupled: whether one example's loss depends on other examples of the batch.
      mismatched_unless: the objective reads mismatched completions unless this hyperparameter
        is set (not None); None when it never reads them.
    """

    kind: str
    needs_reference: bool
    batch_coupled: bool
    mismatched_unless: str | None = None

    def needs_mismatched(self, hyper) -> bool:
        """Whether, with these hyperparameters, the engine must score mismatched completions."""
        key = self.mismatched_unless
        return key is not None and dict(hyper).get(key) is None


_KINDS = {"PairwiseInputs": "pairwise", "UnpairedInputs": "unpaired",
          "ListwiseInputs": "listwise", "RewardPairInputs": "reward", "DistillInputs": "distill",
          "RolloutInputs": "rollout"}


def _inputs_kind(fn: Callable) -> str:
    target = getattr(fn, "phi", None) or fn
    call = target if inspect.isfunction(target) else getattr(target, "__call__", target)
    try:
        annotation = inspect.signature(call).parameters["inputs"].annotation
    except (KeyError, ValueError, TypeError):
        return "pairwise"
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return next((kind for cls, kind in _KINDS.items() if cls in str(text)), "pairwise")


def info(name: str) -> LossInfo:
    """Kind, reference need, batch coupling and mismatched inputs of the objective `name`."""
    fn = get(name)
    return LossInfo(kind=_inputs_kind(fn), needs_reference=name not in REFERENCE_FREE,
                    batch_coupled=name in BATCH_COUPLED, mismatched_unless=MISMATCHED.get(name))

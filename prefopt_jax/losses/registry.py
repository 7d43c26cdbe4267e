"""Objectives by name, each registered with what it needs: `register(name, inputs=..., ...)`.

Names are the registry names of docs/objectives.md (generated from this registry by
`docs/generate_objectives.py`). Selection happens by name in configs, never through
`if name == ...` chains: the engine reads the declaration (`info`) and supplies what it names.

A declaration says
  inputs     the inputs type the objective reads (`INPUTS`);
  reference  whether reference log-probs enter its formula;
  reference_off  the hyper-parameter (a KL coefficient) at whose value 0 they do not: the
             objective then runs without a reference (no reference model, no reference pass);
  coupling   "none", "batch" (a statistic over the batch: BCO's running mean) or "sort" (a sort
             over the whole batch: AOT), which gradient accumulation cannot split; needs such as
             mismatched completions (KTO's z0) couple the batch by themselves;
  needs      what the engine must supply beyond policy and reference log-probs (`NEEDS`);
  waived_by  needs a hyper-parameter replaces when it is set (KTO's mismatched completions by z0);
  token_terms  for objectives that read the vocabulary (teacher logits): the per-token function
             of the logits the engine evaluates in its log-prob chunks (`DistillInputs`);
  paper      where the objective comes from.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from prefopt_jax.errors import UserError

_REGISTRY: dict[str, Callable] = {}
_INFO: dict[str, "LossInfo"] = {}

# The inputs types (`losses.base`) and the data they come from.
INPUTS = {
    "pairwise": "a chosen and a rejected completion per prompt (PairwiseInputs)",
    "unpaired": "one completion per example, labelled desirable or not (UnpairedInputs)",
    "listwise": "K completions per prompt with scores (ListwiseInputs)",
    "reward": "reward-head scores of a chosen and a rejected completion (RewardPairInputs)",
    "distill": "per-token KL to a teacher over the vocabulary, every completion (DistillInputs)",
    "rollout": "completions sampled from the policy, with rewards (RolloutInputs)",
    "images": "one denoising error per image: diffusion pre-training (ImageInputs)",
    "denoising": "denoising errors of a chosen and a rejected image under policy and reference "
                 "at a shared t and noise (DenoisingInputs)",
    "denoising_unpaired": "denoising errors of single images labelled desirable or not "
                          "(DenoisingUnpairedInputs)",
    "denoising_list": "denoising errors of K scored images per prompt (DenoisingListInputs)",
    "trajectory": "denoising trajectories sampled from the diffusion policy, each step's "
                  "log-prob, and rewards of the final images (TrajectoryInputs)",
}
# The inputs kinds of diffusion objectives (trained by `prefopt_jax.diffusion.train`).
DIFFUSION_INPUTS = ("images", "denoising", "denoising_unpaired", "denoising_list", "trajectory")
# What the engine supplies beyond the policy's and the reference's log-probs.
NEEDS = {
    "gold": "a gold completion per example (triple data: prompt, gold, chosen, rejected)",
    "mismatched": "mismatched completions (prompt i with completion i+1), scored in the step",
    "token_rewards": "per-token rewards b (log pi_dpo - log pi_ref) of a frozen DPO policy "
                     "(AlgoConfig.teacher)",
    "teacher_logits": "vocabulary logits of a frozen DPO teacher and its reference "
                      "(AlgoConfig.teacher)",
    "margins": "each completion's reward under other reward models (AlgoConfig.margins)",
    "win_probs": "win probabilities of chosen and rejected against the previous iterate "
                 "(win_prob_chosen, win_prob_rejected)",
    "token_stats": "per-token statistics of the policy's vocabulary distribution (WPO's "
                   "log sum_v p_v^2), computed in the log-prob chunks",
    "rollouts": "samples drawn from the policy (completions, or denoising trajectories) and "
                "their rewards",
    "group_preferences": "win probabilities P(y_i beats y_j) between the samples of each group "
                         "from a preference scorer (RLConfig.preference)",
    "reference_samples": "a previous checkpoint of the policy, drawn at random, as the "
                         "reference, whose own sample for each prompt is the rejected image "
                         "(SePPO; DiffusionConfig.reference_every)",
    "critic": "a value model trained beside the policy in the same step (per-token values; "
              "AlgoConfig.critic)",
}
COUPLINGS = ("none", "batch", "sort")
# Needs that couple the examples of a batch by themselves (mismatched completions pair example i
# with example i + 1), so an objective whose need is waived couples nothing through it.
COUPLING_OF_NEEDS = {"mismatched": "batch"}


class UnknownLossError(UserError, KeyError):
    """An objective name that is not registered; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


class ObjectiveError(UserError, ValueError):
    """A user error in choosing or configuring an objective (name, hyper-parameter, need)."""


@dataclasses.dataclass(frozen=True)
class LossInfo:
    """What the engine must know about an objective before building a step (its declaration).

    Attributes:
      name: the registry name.
      inputs: the inputs type it reads (a key of `INPUTS`).
      reference: whether reference log-probs enter the formula.
      reference_off: the hyper-parameter (a KL coefficient) at whose value 0 they do not
        (`objective.single` then declares no reference).
      coupling: "none", "batch" or "sort" (see the module docstring).
      needs: names from `NEEDS` the engine must supply.
      waived_by: (need, hyper-parameter) pairs: the need is dropped when that is set (not None).
      paper: where the objective comes from.
      token_terms: `fn(student_logits, teacher_logits, ref_logits, **hyper) -> {name: [...]}`
        per-token terms for "distill" inputs (None for the others).
    """

    name: str
    inputs: str
    reference: bool
    coupling: str = "none"
    needs: tuple[str, ...] = ()
    waived_by: tuple[tuple[str, str], ...] = ()
    paper: str = ""
    token_terms: Callable | None = None
    reference_off: str | None = None

    def effective_coupling(self, hyper=()) -> str:
        """The declared coupling, raised by needs that couple the batch (while not waived)."""
        found = [self.coupling] + [COUPLING_OF_NEEDS[n] for n in self.active_needs(hyper)
                                   if n in COUPLING_OF_NEEDS]
        return max(found, key=COUPLINGS.index)

    def active_needs(self, hyper=()) -> tuple[str, ...]:
        """The needs left once hyper-parameters that replace one are set."""
        hyper = dict(hyper)
        waived = {need for need, key in self.waived_by if hyper.get(key) is not None}
        return tuple(n for n in self.needs if n not in waived)


def register(name: str, *, inputs: str, reference: bool, coupling: str = "none",
             needs: tuple[str, ...] = (), waived_by: dict | None = None, paper: str = "",
             token_terms: Callable | None = None,
             reference_off: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator registering `fn` under `name` with its declaration (see the module docstring).

    Registering a name twice, or declaring an unknown inputs type, coupling or need, is an error.
    """
    if inputs not in INPUTS:
        raise ValueError(f"{name}: unknown inputs {inputs!r}; known: {sorted(INPUTS)}")
    if coupling not in COUPLINGS:
        raise ValueError(f"{name}: unknown coupling {coupling!r}; known: {COUPLINGS}")
    unknown = sorted(set(needs) - set(NEEDS) | set(waived_by or {}) - set(needs))
    if unknown:
        raise ValueError(f"{name}: unknown or undeclared needs {unknown}; known: {sorted(NEEDS)}")
    if reference_off is not None and not reference:
        raise ValueError(f"{name}: reference_off {reference_off!r} without a reference")
    info = LossInfo(name, inputs, reference, coupling, tuple(needs),
                    tuple(sorted((waived_by or {}).items())), paper, token_terms, reference_off)

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered (by {_REGISTRY[name]!r})")
        if reference_off is not None and reference_off not in hyper_defaults(fn):
            raise ValueError(f"{name}: reference_off {reference_off!r} is no hyper-parameter")
        _REGISTRY[name], _INFO[name] = fn, info
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


def info(name: str) -> LossInfo:
    """The declaration of the objective `name` (inputs, reference, coupling, needs, paper)."""
    get(name)
    return _INFO[name]


def signature_target(fn: Callable) -> Callable:
    """The function whose keyword-only parameters are an objective's hyper-parameters."""
    return getattr(fn, "phi", None) or getattr(fn, "hyper_signature", None) or fn


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


def parameter_defaults(params) -> dict[str, Any]:
    """{name: default, or `REQUIRED`} of `inspect.Parameter`s."""
    return {p.name: (REQUIRED if p.default is inspect.Parameter.empty else p.default)
            for p in params}


def hyper_defaults(fn: Callable) -> dict[str, Any]:
    """An objective's hyper-parameters and their defaults (`REQUIRED` when it has none)."""
    params = inspect.signature(signature_target(fn)).parameters.values()
    return parameter_defaults(p for p in params if p.kind == p.KEYWORD_ONLY)


def check_keywords(what: str, known: dict[str, Any], given, where: str = "") -> None:
    """Refuse names `known` (from `parameter_defaults`) lacks, and missing required ones.

    `what` names the owner in messages, e.g. "objective 'dpo'"; `where` the binding to set.
    """
    given = dict(given)
    unknown = sorted(set(given) - set(known))
    kind = "hyper-parameter" if what.startswith("objective") else "parameter"
    if unknown:
        raise ObjectiveError(f"{what} has no {kind} {unknown[0]!r}; its {kind}s: "
                             f"{', '.join(known) or 'none'}")
    missing = [k for k, v in known.items() if v is REQUIRED and k not in given]
    if missing:
        raise ObjectiveError(f"{what} needs {kind} {missing[0]!r}{where}")


def check_hyper(name: str, fn: Callable, hyper) -> None:
    """Refuse hyper-parameter names the objective does not take, and missing required ones."""
    check_keywords(f"objective {name!r}", hyper_defaults(fn), hyper,
                   " (AlgoConfig.hyper); it has no default")

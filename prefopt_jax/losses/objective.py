"""An objective as a config names it: one registered loss, or a weighted mix, then modifiers.

`compose(loss, hyper, mix, modifiers)` checks every name and hyper-parameter against the
registry (`losses.registry`) and the modifiers' table (`losses.modifiers.MODIFIERS`), and
returns the loss function together with the declaration the engine reads: the inputs type, the
reference need, the batch coupling and every need, merged over the mix and the modifiers. It
fails before any compute with an `ObjectiveError` naming the objective, modifier or
hyper-parameter and the valid choices.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

from prefopt_jax.losses import modifiers as modifiers_lib
from prefopt_jax.losses.registry import (COUPLINGS, LossInfo, ObjectiveError, UnknownLossError,
                                         check_hyper, check_keywords, get, hyper_defaults,
                                         info, parameter_defaults)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A composed objective: call `fn(inputs, state, **dict(hyper))`.

    Attributes:
      name: for messages and logs, e.g. `wpo(dpo)` or `mix(dpo*0.8, sft*1.0)`.
      fn: the loss function.
      hyper: the hyper-parameters passed at each call, as sorted (name, value) pairs (empty for
        a mix, whose components carry their own).
      info: the merged declaration (`LossInfo`); its `needs` are the active ones.
    """

    name: str
    fn: Callable
    hyper: tuple
    info: LossInfo

    def __call__(self, inputs, state=None):
        return self.fn(inputs, state, **dict(self.hyper))

    def setting(self, key: str, absent=None):
        """A hyper-parameter's value as the loss sees it: the one given, else the registered
        function's default, else `absent` (the loss has no such parameter). None for a mix,
        whose components keep their own values."""
        if self.info.name == "mix":
            return None
        return {**hyper_defaults(get(self.info.name)), **dict(self.hyper)}.get(key, absent)


def _known(name: str) -> Callable:
    try:
        return get(name)
    except UnknownLossError as err:
        raise ObjectiveError(str(err)) from None


def single(name: str, hyper=()) -> Objective:
    """One registered objective with its hyper-parameters checked."""
    fn = _known(name)
    check_hyper(name, fn, hyper)
    decl = info(name)
    objective = Objective(name, fn, tuple(sorted(dict(hyper).items())), decl)
    # A KL coefficient of 0: the reference is never read.
    off = decl.reference_off is not None and objective.setting(decl.reference_off) == 0
    decl = dataclasses.replace(decl, needs=decl.active_needs(hyper), waived_by=(),
                               coupling=decl.effective_coupling(hyper),
                               reference=decl.reference and not off)
    return dataclasses.replace(objective, info=decl)


def _component(entry) -> tuple[str, float, dict]:
    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise ObjectiveError(f"AlgoConfig.mix entries are (name, weight) or (name, weight, "
                             f"hyper), got {entry!r}")
    return str(entry[0]), float(entry[1]), dict(entry[2]) if len(entry) == 3 else {}


def mixed(entries: Sequence) -> Objective:
    """The weighted sum of several objectives of one inputs type (`modifiers.mix`)."""
    parts = [(name, weight, single(name, hyper))
             for name, weight, hyper in map(_component, entries)]
    kinds = {p[2].info.inputs for p in parts}
    if len(kinds) > 1:
        listed = ", ".join(f"{n} ({o.info.inputs})" for n, _, o in parts)
        raise ObjectiveError(f"AlgoConfig.mix combines objectives of one inputs type; got {listed}")
    decls = [o.info for _, _, o in parts]
    needs = tuple(dict.fromkeys(n for d in decls for n in d.needs))
    coupling = max((d.coupling for d in decls), key=COUPLINGS.index)
    terms = next((d.token_terms for d in decls if d.token_terms is not None), None)
    decl = LossInfo("mix", decls[0].inputs, any(d.reference for d in decls), coupling, needs,
                    (), "; ".join(dict.fromkeys(d.paper for d in decls if d.paper)), terms)
    fn = modifiers_lib.mix([(n, w, dict(o.hyper)) for n, w, o in parts])
    return Objective(fn.__name__, lambda inputs, state=None: fn(inputs, state), (), decl)


def modifier_params(name: str, apply: Callable, params: dict) -> dict:
    """A modifier's parameters checked against its signature (all but the wrapped loss)."""
    known = parameter_defaults(list(inspect.signature(apply).parameters.values())[1:])
    check_keywords(f"modifier {name!r}", known, params)
    return dict(params)


def modified(objective: Objective, name: str, params: dict) -> Objective:
    """`objective` wrapped by the modifier `name`, refused where it does not apply."""
    if name not in modifiers_lib.MODIFIERS:
        raise ObjectiveError(f"unknown modifier {name!r}; known: "
                             f"{', '.join(sorted(modifiers_lib.MODIFIERS))}")
    mod = modifiers_lib.MODIFIERS[name]
    reason = mod.refuses(objective.fn, objective.info)
    if reason:
        raise ObjectiveError(f"modifier {name!r} does not apply to {objective.name!r}: {reason}")
    params = modifier_params(name, mod.apply, params)
    try:
        fn = mod.apply(objective.fn, **params)
    except ValueError as err:  # a parameter's value (an unknown divergence, alpha out of range)
        raise ObjectiveError(f"modifier {name!r}: {err}") from None
    decl = dataclasses.replace(
        objective.info, needs=tuple(dict.fromkeys(objective.info.needs + mod.needs)),
        reference=objective.info.reference and not mod.drops_reference)
    label = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
    return Objective(f"{name}({objective.name}{', ' + label if label else ''})", fn,
                     objective.hyper, decl)


def compose(loss: str | None = None, hyper=(), mix: Sequence = (),
            modifiers: Sequence = ()) -> Objective:
    """The objective of a config: `loss` (default dpo) or `mix`, then each modifier in order.

    `modifiers`: (name, params) pairs, e.g. `[('f_divergence', {'divergence': 'js'})]`.
    """
    if mix:
        if loss not in (None, "mix"):
            raise ObjectiveError(f"AlgoConfig.loss = {loss!r} and AlgoConfig.mix are both set; "
                                 "a mix is the objective: leave AlgoConfig.loss unset (or 'mix')")
        if dict(hyper):
            raise ObjectiveError("with AlgoConfig.mix, give each component's hyper-parameters "
                                 "in its entry, e.g. ('dpo', 0.8, {'beta': 0.1}); "
                                 "AlgoConfig.hyper must be empty")
        objective = mixed(mix)
    else:
        objective = single(loss or "dpo", hyper)
    for entry in modifiers:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (1, 2):
            raise ObjectiveError(f"AlgoConfig.modifiers entries are (name, params), got "
                                 f"{entry!r}")
        objective = modified(objective, str(entry[0]), dict(entry[1]) if len(entry) == 2 else {})
    return objective

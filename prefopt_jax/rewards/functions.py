"""Reward functions for training on sampled completions, in the convention TRL users write.

A reward function is called once per batch as

    fn(prompts, completions, **fields) -> list[float | None]

where `fields` are the prompt dataset's other columns, each a list aligned with `prompts` (for
example `answer`). `None` means "no opinion" on that sample: it is left out of the weighted sum
(and of that function's own statistics); a sample no function has an opinion on has no reward.

TRL's reward functions run unchanged. A function that names `prompts`, `completions` or
`completion_ids` is called by keyword, as TRL calls it (`def f(completions, **kwargs)` works);
one that names `completion_ids`, or takes `**kwargs`, also gets each completion's sampled
token ids. A conversational prompt comes as its list of messages and each of its completions as one
assistant message, `[{"role": "assistant", "content": text}]` (`online.rl.reward_inputs`); the
built-in functions take either form (`completion_texts`).

Configs name a function as `'package.module:function'` (any importable callable) or by a
built-in name (`BUILTINS`); `(name, {params})` passes parameters to a built-in's factory.
`RewardFunctions` holds several with weights and returns the weighted sum and each function's
own column. A function that raises stops the run naming the function and the first prompt index
it fails on; a wrong number or type of results is refused the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from prefopt_jax.errors import ConfigError, UserError


class RewardFunctionError(UserError, RuntimeError):
    """A reward function that failed or returned something other than one number per sample."""


def completion_texts(completions) -> list[str]:
    """The completions as text: a text completion as it is, TRL's conversational form (a list
    of messages) as its last message's content."""
    return [c if isinstance(c, str) else str(c[-1]["content"]) if c else "" for c in completions]


# Built-in reward functions (factories take the `(name, {params})` parameters).

def math_answer(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion's answer (its last `\\boxed{}`, else its final expression or
    number) equals the `answer` column under `math-verify`, else 0.0; None without an answer."""
    if answer is None:
        raise ValueError("needs an 'answer' column in the prompt data")
    from math_verify import parse, verify
    out = []
    for completion, gold in zip(completion_texts(completions), answer):
        if gold is None:
            out.append(None)
            continue
        gold_parsed = parse(str(gold))
        predicted = parse(completion)
        out.append(float(bool(gold_parsed and predicted and verify(gold_parsed, predicted))))
    return out


def exact_match(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion, stripped, equals the `answer` column, stripped."""
    if answer is None:
        raise ValueError("needs an 'answer' column in the prompt data")
    return [None if gold is None else float(c.strip() == str(gold).strip())
            for c, gold in zip(completion_texts(completions), answer)]


def regex(pattern: str, full: bool = False) -> Callable:
    """1.0 when the completion matches `pattern` (searched; `full`: the whole completion)."""
    compiled = re.compile(pattern, re.S)
    match = compiled.fullmatch if full else compiled.search

    def reward(prompts, completions, **_):
        return [float(match(c.strip() if full else c) is not None)
                for c in completion_texts(completions)]

    reward.__name__ = f"regex({pattern!r})"
    return reward


def share(pattern: str) -> Callable:
    """The fraction of the completion's whitespace-separated words that match `pattern` whole
    (e.g. `'[0-9]*[02468]'` on a tokenizer-less model's ids: the share of even token ids)."""
    compiled = re.compile(pattern)

    def reward(prompts, completions, **_):
        out = []
        for c in completion_texts(completions):
            words = c.split()
            out.append(sum(compiled.fullmatch(w) is not None for w in words) / max(len(words), 1))
        return out

    reward.__name__ = f"share({pattern!r})"
    return reward


def think_format() -> Callable:
    """The R1 format: `<think>...</think>` then an answer (1.0 / 0.0)."""
    return regex(r"<think>.*?</think>\s*\S.*", full=True)


def length_penalty(max_chars: int, penalty: float = 1.0) -> Callable:
    """`-penalty * max(0, len - max_chars) / max_chars`: 0 up to `max_chars` characters, then
    growing linearly (the soft overlong penalty acts on tokens inside the loop)."""
    def reward(prompts, completions, **_):
        return [-penalty * max(0, len(c) - max_chars) / max_chars
                for c in completion_texts(completions)]

    return reward


def sentiment(prompts, completions, **_) -> list[float]:
    """VADER's compound sentiment of the completion, in [-1, 1]."""
    from prefopt_jax.rewards.sentiment import compound
    return [float(s) for s in compound(completion_texts(completions))]


BUILTINS: dict[str, Callable] = {
    "math_answer": math_answer, "exact_match": exact_match, "sentiment": sentiment,
}
FACTORIES: dict[str, Callable] = {
    "regex": regex, "think_format": think_format, "length_penalty": length_penalty,
    "share": share,
}


def resolve(spec) -> tuple[str, Callable]:
    """(name, function) of a spec: a callable, a built-in name, `'pkg.module:function'`, or
    `(name, {params})` for a built-in factory."""
    if callable(spec):
        return getattr(spec, "__name__", repr(spec)), spec
    params = {}
    if isinstance(spec, (tuple, list)):
        spec, params = spec[0], dict(*spec[1:])
    if not isinstance(spec, str):
        raise ConfigError(f"reward function {spec!r}: expected a name, 'package.module:function' "
                          "or (name, {params})")
    if spec in FACTORIES:
        try:
            return spec, FACTORIES[spec](**params)
        except TypeError as err:
            raise ConfigError(f"reward function {spec!r}: {err}") from None
    if params:
        raise ConfigError(f"reward function {spec!r} takes no parameters (factories with "
                          f"parameters: {', '.join(sorted(FACTORIES))})")
    if spec in BUILTINS:
        return spec, BUILTINS[spec]
    if ":" not in spec:
        raise ConfigError(f"unknown reward function {spec!r}; built in: "
                          f"{', '.join(sorted({*BUILTINS, *FACTORIES}))}; or name your own as "
                          "'package.module:function'")
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward function {spec!r}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r} is not callable")
    return spec, fn


@dataclasses.dataclass(frozen=True)
class Rewards:
    """One batch's rewards: `total_n` (NaN where no function had an opinion), each function's
    column `columns_nm` (NaN for None) and the functions' names."""

    total_n: np.ndarray
    columns_nm: np.ndarray
    names: tuple[str, ...]

    def metrics(self) -> dict[str, float]:
        """Mean and std of the total and each function's mean, over the samples with a value."""
        out = {"reward/mean": _nanmean(self.total_n), "reward/std": _nanstd(self.total_n)}
        for m, name in enumerate(self.names):
            out[f"reward/{name}"] = _nanmean(self.columns_nm[:, m])
        return out


def _nanmean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")


def _nanstd(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.std(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")


SCORER_PREFIX = "scorer:"


class PARShaping:
    """PAR: a token scorer's reward shaped as `(1/M) sum_m s(r(x, y) - r(x, y_ref_m))` against
    M replies of the reference policy to the same prompt, sampled at every call from the
    reference the caller passes (the online loop's reference model)."""

    def __init__(self, inner: Callable, num_ref: int = 10):
        self.inner, self.num_ref = inner, num_ref

    def __call__(self, candidates, reference) -> np.ndarray:
        """`reference`: (model, sampling config, seed, pad id) of the reference replies."""
        from prefopt_jax.rewards.scorers import PARScorer
        model, config, seed, pad_id = reference
        return PARScorer(self.inner, ref_model=model, num_ref=self.num_ref, config=config,
                         seed=seed, pad_id=pad_id)(candidates)


def resolve_scorer(spec: str, tokenizer) -> tuple[str, Callable]:
    """(name, scorer) of `scorer:SPEC`: a token scorer of `rewards.scorers.from_spec` (a
    reward model `rm:DIR`, an ensemble `ensemble:DIR1,DIR2` aggregated by the mean, or by WCO
    or UWO with a suffix `@wco` / `@uwo`, the implicit reward of a DPO policy `implicit:DIR`,
    VADER `sentiment`), called on the sampled tokens rather than on text; `par:SPEC[@M]` shapes
    one of those by PAR against M (default 10) replies of the reference policy (`PARShaping`)."""
    from prefopt_jax.rewards import scorers
    inner, aggregate = spec[len(SCORER_PREFIX):], "mean"
    if inner.startswith("par:"):
        inner, num_ref = inner[len("par:"):], 10
        if "@" in inner and inner.rsplit("@", 1)[1].isdigit():
            inner, count = inner.rsplit("@", 1)
            num_ref = int(count)
        if num_ref < 1:
            raise ConfigError(f"reward {spec!r}: PAR needs at least one reference reply")
        return spec, PARShaping(resolve_scorer(SCORER_PREFIX + inner, tokenizer)[1], num_ref)
    if inner.startswith("ensemble:") and "@" in inner:
        inner, aggregate = inner.rsplit("@", 1)
    try:
        return spec, scorers.from_spec(inner, tokenizer, aggregate)
    except (ValueError, OSError) as err:
        raise ConfigError(f"reward {spec!r}: {err}") from None


class RewardFunctions:
    """Several reward functions with weights: `rf(prompts, completions, fields) -> Rewards`.

    A spec `scorer:SPEC` is a token scorer (`resolve_scorer`): the call must then pass the
    sampled tokens as `tokens=(prompt_ids_b, tokens_bkc, mask_bkc)`, K samples per prompt, rows
    `b K + k` of the text lists.
    """

    def __init__(self, specs: Sequence[Any], weights: Sequence[float] | None = None,
                 tokenizer=None):
        if not specs:
            raise ConfigError("no reward functions given")
        resolved = [resolve_scorer(s, tokenizer) + (True,)
                    if isinstance(s, str) and s.startswith(SCORER_PREFIX)
                    else resolve(s) + (False,) for s in specs]
        self.on_tokens = tuple(t for *_, t in resolved)
        resolved = [(name, fn) for name, fn, _ in resolved]
        self.names = tuple(name for name, _ in resolved)
        self.fns = tuple(fn for _, fn in resolved)
        self.weights = tuple(float(w) for w in (weights or [1.0] * len(specs)))
        if len(self.weights) != len(self.fns):
            raise ConfigError(f"{len(self.weights)} reward weights for {len(self.fns)} reward "
                              "functions")

    @property
    def needs_reference(self) -> bool:
        """Whether a scorer shapes against the reference policy's replies (PAR)."""
        return any(isinstance(fn, PARShaping) for fn in self.fns)

    def __call__(self, prompts: list, completions: list, fields: dict[str, list] | None = None,
                 tokens=None, reference=None) -> Rewards:
        fields = fields or {}
        for key, column in fields.items():
            if len(column) != len(prompts):
                raise RewardFunctionError(f"field {key!r} has {len(column)} values for "
                                          f"{len(prompts)} prompts")
        ids = None
        if tokens is not None:  # each completion's sampled ids, for `completion_ids`
            tokens_bkc, mask_bkc = np.asarray(tokens[1]), np.asarray(tokens[2])
            ids = [row[keep > 0].tolist() for row, keep in
                   zip(tokens_bkc.reshape(-1, tokens_bkc.shape[-1]),
                       mask_bkc.reshape(-1, mask_bkc.shape[-1]))]
        columns = [self._score(name, fn, tokens, reference) if on_tokens
                   else self._call(name, fn, prompts, completions, fields, ids)
                   for name, fn, on_tokens in zip(self.names, self.fns, self.on_tokens)]
        columns_nm = np.stack(columns, axis=1) if columns else np.zeros((len(prompts), 0))
        weighted_nm = columns_nm * np.asarray(self.weights)[None]
        opinion_n = np.any(~np.isnan(columns_nm), axis=1)
        total_n = np.where(opinion_n, np.nansum(weighted_nm, axis=1), np.nan)
        return Rewards(total_n, columns_nm, self.names)

    @staticmethod
    def _score(name, scorer, tokens, reference=None) -> np.ndarray:
        """A token scorer's column (rows `b K + k`); PAR samples from `reference`."""
        if tokens is None:
            raise RewardFunctionError(f"reward {name} scores tokens; none were given")
        from prefopt_jax.sampling.scorers import Candidates
        prompts, tokens_bkc, mask_bkc = tokens
        candidates = Candidates(list(prompts), np.asarray(tokens_bkc), np.asarray(mask_bkc))
        if isinstance(scorer, PARShaping):
            if reference is None:
                raise RewardFunctionError(f"reward {name} shapes against the reference "
                                          "policy's replies; none was given")
            scores_bk = np.asarray(scorer(candidates, reference), np.float64)
        else:
            scores_bk = np.asarray(scorer(candidates), np.float64)
        if not np.all(np.isfinite(scores_bk)):
            raise RewardFunctionError(f"reward {name} gave a non-finite score")
        return scores_bk.reshape(-1)

    @staticmethod
    def _call(name, fn, prompts, completions, fields, completion_ids=None) -> np.ndarray:
        """One function's column; a failure names the function and the first failing prompt."""
        if completion_ids is not None and _takes(fn, "completion_ids"):
            fields = {**fields, "completion_ids": completion_ids}
        try:
            values = _invoke(fn, prompts, completions, fields)
        except Exception as err:  # noqa: BLE001 -- find the sample, then report it
            index = _first_failing(fn, prompts, completions, fields)
            where = f"prompt {index}" if index is not None else "the batch"
            raise RewardFunctionError(
                f"reward function {name} failed on {where}: {type(err).__name__}: {err}"
            ) from err
        values = list(values) if values is not None else []
        if len(values) != len(prompts):
            raise RewardFunctionError(f"reward function {name} returned {len(values)} values "
                                      f"for {len(prompts)} completions")
        out = np.full(len(values), np.nan)
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                raise RewardFunctionError(f"reward function {name} returned {v!r} for prompt "
                                          f"{i}; expected a number or None") from None
            if not math.isfinite(out[i]):
                raise RewardFunctionError(f"reward function {name} returned {v!r} for prompt "
                                          f"{i}; expected a finite number or None")
        return out


def _takes(fn, name: str, by_name_only: bool = False) -> bool:
    """Whether `fn` accepts a keyword argument `name`: a parameter of that name, or (unless
    `by_name_only`) `**kwargs`."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any((p.name == name and p.kind is not p.POSITIONAL_ONLY)
               or (p.kind is p.VAR_KEYWORD and not by_name_only) for p in params)


TRL_NAMES = ("prompts", "completions", "completion_ids")


def _invoke(fn, prompts, completions, fields):
    """`fn` on a batch: by keyword when it names one of TRL's parameters (`TRL_NAMES`, e.g.
    `def f(completions, **kwargs)`), else `prompts` and `completions` by position."""
    if any(_takes(fn, name, by_name_only=True) for name in TRL_NAMES):
        return fn(prompts=prompts, completions=completions, **fields)
    return fn(prompts, completions, **fields)


def _first_failing(fn, prompts, completions, fields) -> int | None:
    """The first sample the function fails on when called alone."""
    for i in range(len(prompts)):
        try:
            _invoke(fn, prompts[i:i + 1], completions[i:i + 1],
                    {k: v[i:i + 1] for k, v in fields.items()})
        except Exception:  # noqa: BLE001
            return i
    return None

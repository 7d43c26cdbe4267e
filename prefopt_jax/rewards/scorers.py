"""Reward models as search scorers: one trained RM, ensembles (mean / WCO / UWO), PAR shaping.

Shape letters: `b` prompts, `n` candidates per prompt, `m` reference replies per prompt,
`e` ensemble members.

Everything returns a callable `scorer(candidates) -> scores_bn` (the `sampling.scorers`
contract), so best-of-N, RSO, `prefopt data build-pairs` and the iterative loop take any of them.
The aggregations and PAR are the functions of `rewards.aggregate`; nothing is re-derived here.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from prefopt_jax.rewards import aggregate as reward_fns
from prefopt_jax.sampling import generate as gen
from prefopt_jax.sampling import scorers
from prefopt_jax.sampling.scorers import Candidates


def reward_model_scorer(rm) -> scorers.RewardModelScorer:
    """A `rewards.reward_model.RewardModel` as a scorer (its trunk and head)."""
    return scorers.RewardModelScorer(rm.trunk, rm.head, rm.skip_id)


def ensemble(members: Sequence, aggregate: str = "mean", lam: float = 0.5
             ) -> scorers.EnsembleScorer:
    """Reward models (or scorers) aggregated by `mean`, `wco` or `uwo` (lam 0.5 BoN, 0.1 PPO)."""
    members = [m if callable(m) and not hasattr(m, "trunk") else reward_model_scorer(m)
               for m in members]
    return scorers.EnsembleScorer(members, aggregate, lam)


class PARScorer:
    """PAR shaping: `(1/M) sum_m s(k (r(x, y) - r(x, y_ref_m)))`, M reference replies per prompt.

    The reference replies are sampled from `ref_model` once per call (or given as
    `ref_candidates`, `[B, M, C]`, for the same prompts) and scored by the same `scorer`.
    """

    def __init__(self, scorer: Callable, ref_model=None, num_ref: int = 10,
                 config: gen.SamplingConfig | None = None, k: float = 1.0, seed: int = 0,
                 ref_candidates: Candidates | None = None, pad_id: int = 0):
        if ref_model is None and ref_candidates is None:
            raise ValueError("PARScorer needs ref_model (to sample references) or ref_candidates")
        self.scorer, self.ref_model, self.num_ref, self.k = scorer, ref_model, num_ref, k
        self.config = config or gen.SamplingConfig()
        self.seed, self.ref_candidates, self.pad_id = seed, ref_candidates, pad_id

    def references(self, candidates: Candidates) -> Candidates:
        """The reference replies for the candidates' prompts."""
        if self.ref_candidates is not None:
            return self.ref_candidates
        from prefopt_jax.sampling.search import sample_candidates

        return sample_candidates(self.ref_model, candidates.prompts, self.num_ref, self.config,
                                 self.seed, self.pad_id)

    def __call__(self, candidates: Candidates) -> np.ndarray:
        scores_bn = np.asarray(self.scorer(candidates), np.float32)
        ref_bm = np.asarray(self.scorer(self.references(candidates)), np.float32)
        b, n = scores_bn.shape
        ref_nm = np.repeat(ref_bm, n, axis=0)
        return np.asarray(reward_fns.par(scores_bn.reshape(b * n), ref_nm, k=self.k)).reshape(b, n)


def from_spec(spec: str, tokenizer=None, aggregate: str = "mean", lam: float = 0.5) -> Callable:
    """A scorer from a command-line spec.

    `sentiment` (VADER on the decoded reply), `length` (reply tokens), `mean_token` (mean
    token id: tiny smoke runs),
    `rm:DIR` (a reward model written by `rewards.reward_model.save`, or a Hugging Face
    `*ForSequenceClassification` reward model with one label, e.g. from TRL's RewardTrainer),
    `ensemble:DIR1,DIR2,...` (reward models aggregated by `aggregate`) or
    `implicit:DIR` / `implicit:DIR@BETA` (a DPO policy's implicit reward
    `beta sum_t log pi/pi_ref`, beta 0.1 by default, against the base model its export names in
    `prefopt_run.json`).
    """
    from prefopt_jax.rewards import reward_model

    kind, _, arg = spec.partition(":")
    if kind == "sentiment":
        if tokenizer is None:
            raise ValueError("the sentiment scorer decodes replies: it needs a tokenizer")
        return scorers.sentiment_scorer(tokenizer)
    if kind == "length":
        return lambda c: np.asarray(c.mask_bnc, np.float32).sum(-1)
    if kind == "mean_token":
        return mean_token_scorer
    if kind == "rm" and arg:
        return reward_model_scorer(reward_model.load(arg)[0])
    if kind == "implicit" and arg:
        return implicit_scorer(*arg.rsplit("@", 1)) if "@" in arg else implicit_scorer(arg)
    if kind == "ensemble" and arg:
        return ensemble([reward_model.load(d)[0] for d in arg.split(",")], aggregate, lam)
    raise ValueError(f"unknown scorer {spec!r}; use sentiment, length, rm:DIR, "
                     "ensemble:DIR1,DIR2,... or implicit:DIR")


def implicit_scorer(directory: str, beta: float | str = 0.1) -> scorers.ImplicitRewardScorer:
    """The implicit reward of the DPO policy exported in `directory`, against its base model."""
    import json
    import os

    from prefopt_jax.models.spec import ModelSpec, load_model
    record = os.path.join(directory, "prefopt_run.json")
    if not os.path.exists(record):
        raise ValueError(f"{record}: not found; the implicit reward needs a policy exported by "
                         "`prefopt train`, which names its base model there")
    with open(record) as f:
        base = json.load(f)["base_model"]
    policy, _ = load_model(ModelSpec(source=directory))
    ref, _ = load_model(ModelSpec(source=base))
    return scorers.ImplicitRewardScorer(policy, ref, float(beta))


def mean_token_scorer(candidates: Candidates) -> np.ndarray:
    """Mean token id of each reply: a synthetic, learnable reward for tiny-model smoke runs."""
    mask_bnc = np.asarray(candidates.mask_bnc, np.float32)
    total_bn = (np.asarray(candidates.tokens_bnc, np.float32) * mask_bnc).sum(-1)
    return total_bn / np.maximum(mask_bnc.sum(-1), 1.0)

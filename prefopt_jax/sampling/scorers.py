"""Scorers for best-of-N and rejection sampling: any callable `scorer(candidates) -> scores_bn`.

Shape letters: `b` prompts, `n` candidates per prompt, `q` flattened rows (`b * n`), `t` prompt
positions (left-padded), `s` prompt plus completion positions, `c` completion positions,
`d` model width, `e` ensemble members.

A scorer takes `Candidates` (prompt token ids and `[B, N, C]` completion tokens with their mask)
and returns float scores `[B, N]`. Implementations: an explicit reward model (Transformer +
`RewardHead`), the implicit reward of a DPO policy against its reference, ensembles of scorers
(mean / WCO / UWO from `rewards.aggregate`), and a Python function on decoded text (e.g. VADER).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.rewards.aggregate import AGGREGATIONS
from prefopt_jax.sampling.generate import left_pad
from prefopt_jax.scoring.logps import float32_projection, gathered_logps


class Candidates(NamedTuple):
    """Completions of a batch of prompts.

    Attributes:
      prompts: `B` token-id lists.
      tokens_bnc: completion tokens; anything past the mask is ignored.
      mask_bnc: 1 for real completion tokens (stop token included).
      logps_bnc: per-token log-probs under the sampling policy, when known.
    """

    prompts: list
    tokens_bnc: np.ndarray
    mask_bnc: np.ndarray
    logps_bnc: np.ndarray | None = None


def forward_inputs(candidates: Candidates, pad_id: int = 0):
    """Rows `prompt || completion` for every candidate: `(tokens_qs, positions_qs, segment_ids_qs)`.

    Prompts are left-padded to a common width `T`, so completion token `c` sits at column `T + c`.
    """
    tokens_bt, positions_bt, segment_ids_bt = left_pad(candidates.prompts, pad_id)
    b, n, c = np.shape(candidates.tokens_bnc)
    rep = lambda x: np.repeat(x, n, axis=0)  # noqa: E731
    mask_qc = np.asarray(candidates.mask_bnc).reshape(b * n, c) > 0
    # Masked slots may hold any pad id; a valid id keeps the embedding lookup in range.
    completion_qc = np.where(mask_qc, np.asarray(candidates.tokens_bnc).reshape(b * n, c), 0)
    start_q1 = rep(positions_bt.max(axis=-1, keepdims=True)) + 1
    tokens_qs = np.concatenate([rep(tokens_bt), completion_qc], axis=1).astype(np.int32)
    positions_qs = np.concatenate([rep(positions_bt), start_q1 + np.arange(c)], axis=1)
    segment_ids_qs = np.concatenate([rep(segment_ids_bt), np.ones((b * n, c), np.int32)], axis=1)
    return tokens_qs, positions_qs.astype(np.int32), segment_ids_qs


@functools.partial(jax.jit, static_argnames=("graphdef", "num_completion"))
def _hidden_and_logps(graphdef, params, tokens_qs, positions_qs, segment_ids_qs, *,
                      num_completion):
    """Hidden states of the prompt's last token and the completion tokens `[Q, 1 + C, D]`, and
    the completion tokens' log-probs `[Q, C]`."""
    model = nnx.merge(graphdef, params)
    hidden_qsd = model(tokens_qs, positions_qs, segment_ids_qs, return_hidden=True)
    q, s = tokens_qs.shape
    start = s - num_completion
    # The output at column j predicts token j + 1; the hidden of token j is the state s || y_j.
    source_qc = jnp.arange(q)[:, None] * s + start - 1 + jnp.arange(num_completion)
    logps_qc = gathered_logps(float32_projection(model), hidden_qsd, source_qc,
                              tokens_qs[:, start:])
    return hidden_qsd[:, start - 1:], logps_qc


def completion_forward(model, candidates: Candidates, pad_id: int = 0,
                       with_prompt_state: bool = False):
    """One forward over all candidates: `(hidden_bncd, logps_bnc)`, logps 0 past the mask;
    `with_prompt_state`: the hidden states are `[B, N, 1 + C, D]`, the prompt's last first."""
    b, n, c = np.shape(candidates.tokens_bnc)
    graphdef, params = nnx.split(model)
    hidden_qcd, logps_qc = _hidden_and_logps(graphdef, params, *forward_inputs(candidates, pad_id),
                                             num_completion=c)
    hidden_qcd = hidden_qcd if with_prompt_state else hidden_qcd[:, 1:]
    mask_bnc = np.asarray(candidates.mask_bnc, np.float32)
    return (hidden_qcd.reshape(b, n, hidden_qcd.shape[1], -1),
            np.asarray(logps_qc).reshape(b, n, c) * mask_bnc)


def completion_logps(model, candidates: Candidates, pad_id: int = 0) -> np.ndarray:
    """Per-token log-probs `[B, N, C]` of the candidates under `model` (0 past the mask)."""
    return completion_forward(model, candidates, pad_id)[1]


class RewardModelScorer:
    """An explicit reward model: a Transformer's hidden states read by a `RewardHead` at each
    reply's last token, or (`skip_id`, a HF classifier's pad id) at its last token other than
    `skip_id`, and at the prompt's last token when there is none (`RewardModel.skip_id`)."""

    def __init__(self, model, head, skip_id: int | None = None):
        self.model, self.head, self.skip_id = model, head, skip_id

    def __call__(self, candidates: Candidates) -> np.ndarray:
        skips = self.skip_id is not None
        hidden_bnsd, _ = completion_forward(self.model, candidates, with_prompt_state=skips)
        b, n, c = np.shape(candidates.tokens_bnc)
        read_qc = np.asarray(candidates.mask_bnc).reshape(b * n, c) > 0
        if skips:  # column 0, the prompt's last token, is read when no reply token is
            read_qc &= np.asarray(candidates.tokens_bnc).reshape(b * n, c) != self.skip_id
            read_qc = np.concatenate([~read_qc.any(axis=1, keepdims=True), read_qc], axis=1)
        scores_q = self.head(hidden_bnsd.reshape(b * n, read_qc.shape[1], -1),
                             mask_bt=jnp.asarray(read_qc))
        return np.asarray(scores_q).reshape(b, n)


class ImplicitRewardScorer:
    """The implicit reward of a DPO policy: `beta * sum_c (log pi - log pi_ref)` over the reply."""

    def __init__(self, policy, ref, beta: float = 0.1):
        self.policy, self.ref, self.beta = policy, ref, beta

    def __call__(self, candidates: Candidates) -> np.ndarray:
        logps_bnc = completion_logps(self.policy, candidates)
        ref_logps_bnc = completion_logps(self.ref, candidates)
        return self.beta * (logps_bnc.sum(-1) - ref_logps_bnc.sum(-1))


class EnsembleScorer:
    """A reward ensemble aggregated by `mean`, `wco` (min) or `uwo` (mean - lam var)."""

    def __init__(self, scorers: Sequence[Callable], aggregate: str = "mean", lam: float = 0.5):
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"unknown ensemble aggregation {aggregate!r}; "
                             f"choose one of {sorted(AGGREGATIONS)}")
        self.scorers, self.aggregate, self.lam = list(scorers), aggregate, lam

    def __call__(self, candidates: Candidates) -> np.ndarray:
        scores_ebn = jnp.stack([jnp.asarray(s(candidates), jnp.float32) for s in self.scorers])
        fn = AGGREGATIONS[self.aggregate]
        kwargs = {"lam": self.lam} if self.aggregate == "uwo" else {}
        return np.asarray(fn(scores_ebn, **kwargs))


class TextScorer:
    """A Python reward on decoded completion text (e.g. VADER sentiment).

    `fn(text) -> float`, or with `batched` `fn(texts) -> scores` over a list of texts.
    """

    def __init__(self, fn: Callable, tokenizer, skip_special_tokens: bool = True,
                 batched: bool = False):
        self.fn, self.tokenizer = fn, tokenizer
        self.skip, self.batched = skip_special_tokens, batched

    def texts(self, candidates: Candidates) -> list[list[str]]:
        """Decoded completions, `[B][N]`."""
        tokens_bnc, mask_bnc = np.asarray(candidates.tokens_bnc), np.asarray(candidates.mask_bnc)
        return [[self.tokenizer.decode(t[m > 0].tolist(), skip_special_tokens=self.skip)
                 for t, m in zip(row_t, row_m)] for row_t, row_m in zip(tokens_bnc, mask_bnc)]

    def __call__(self, candidates: Candidates) -> np.ndarray:
        texts = self.texts(candidates)
        if self.batched:
            flat = np.asarray(self.fn([t for row in texts for t in row]), np.float32)
            return flat.reshape(len(texts), -1)
        return np.asarray([[float(self.fn(t)) for t in row] for row in texts], np.float32)


def sentiment_scorer(tokenizer) -> TextScorer:
    """VADER compound sentiment of the decoded reply (`prefopt_jax.rewards.sentiment`)."""
    from prefopt_jax.rewards import sentiment

    return TextScorer(sentiment.compound, tokenizer, batched=True)

"""Search on language-model policies: beam search, best-of-N, rejection sampling, guided decoding.

Shape letters: `b` prompts, `w` beams, `n` candidates per prompt, `k` accepted samples or top-k
tokens or expansion candidates, `q` flattened rows (`b * w` or `b * n`, prompt-major), `t` prompt
positions (left-padded), `c` completion positions, `v` vocabulary, `d` model width.

The search loops are model-agnostic: a policy is a step function `step_fn(state, token_b) ->
(logits_bv, state)`, its first logits, and (for beams) `reorder_fn(state, index_b) -> state`.
The Transformer gets them from `generate.prefill` / `model_step` / `reorder_state` (KV cache);
`tabular_policy` builds them for the exact token-MDP testbed, so tests check the same code.
Everything that touches a model is one jitted function with the graphdef static.

Scorers for best-of-N and rejection sampling live in `prefopt_jax.sampling.scorers`; the learned
value head of value-guided decoding is trained by `prefopt_jax.sampling.value`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.sampling import generate as gen
from prefopt_jax.sampling.scorers import Candidates, completion_logps

NEG_INF = -jnp.inf


# ---------------------------------------------------------------- policies as step functions


def tabular_policy(logits_pnv, prompt_b, vocab_size: int):
    """`(logits_bv, state, step_fn, reorder_fn)` of a tabular policy (tokenmdp.tabular layout).

    The state is `(prompt_b, node_b)`; the child of node `n` by token `a` is `V n + 1 + a`.
    Terminal nodes have no logits of their own, so the last choice node's are returned there
    (a loop of exactly `H` steps never uses them).
    """
    logits_pnv = jnp.asarray(logits_pnv, jnp.float32)
    last_node = logits_pnv.shape[1] - 1

    def logits_at(prompt_b, node_b):
        return logits_pnv[prompt_b, jnp.minimum(node_b, last_node)]

    def step_fn(state, token_b):
        prompt_b, node_b = state
        node_b = vocab_size * node_b + 1 + token_b
        return logits_at(prompt_b, node_b), (prompt_b, node_b)

    def reorder_fn(state, index_b):
        return jax.tree.map(lambda x: jnp.take(x, index_b, axis=0), state)

    prompt_b = jnp.asarray(prompt_b, jnp.int32)
    state = (prompt_b, jnp.zeros_like(prompt_b))
    return logits_at(*state), state, step_fn, reorder_fn


# ---------------------------------------------------------------- beam search


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Beam search settings; frozen so it can be a static jit argument.

    Attributes:
      num_beams: beams `W` kept per prompt, and finished hypotheses returned per prompt.
      max_new_tokens: tokens per beam at most.
      length_penalty: `alpha` of the Hugging Face score `sum logp / len^alpha`; `len` counts the
        generated tokens including the stop token. 0 ranks by plain log-likelihood.
      stop_ids: tokens that finish a beam (kept in it).
    """

    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {self}")


class BeamResult(NamedTuple):
    """Finished beams per prompt, best first (numpy arrays).

    Attributes:
      tokens_bwc: beam tokens; `pad_id` after a beam's length.
      logps_bwc: per-token log-probs under the searched policy; 0 past the length.
      mask_bwc: 1 for the beam's tokens (stop token included).
      lengths_bw: tokens per beam.
      scores_bw: the ranking score `sum logp / len^alpha`.
      sum_logps_bw: the log-likelihood `sum logp`.
      rewards_bw: implicit rewards `b (log pi - log pi_ref)` given a reference, else None.
    """

    tokens_bwc: np.ndarray
    logps_bwc: np.ndarray
    mask_bwc: np.ndarray
    lengths_bw: np.ndarray
    scores_bw: np.ndarray
    sum_logps_bw: np.ndarray
    rewards_bw: np.ndarray | None = None


def _normalise(sum_x, length_x, alpha):
    """Hugging Face's length-normalised beam score."""
    return sum_x / jnp.maximum(length_x, 1).astype(jnp.float32) ** alpha


def _expand(run, logits_qv, i, w, k):
    """The `k` best one-token extensions of the running beams: scores, tokens, histories."""
    score_bw, tokens_bwc, logps_bwc = run
    b = score_bw.shape[0]
    logp_bwv = jax.nn.log_softmax(logits_qv.astype(jnp.float32), axis=-1).reshape(b, w, -1)
    v = logp_bwv.shape[-1]
    cand_bx = (score_bw[:, :, None] + logp_bwv).reshape(b, w * v)
    score_bk, flat_bk = jax.lax.top_k(cand_bx, k)
    beam_bk, token_bk = flat_bk // v, (flat_bk % v).astype(jnp.int32)
    tok_logp_bk = jnp.take_along_axis(logp_bwv.reshape(b, w * v), flat_bk, axis=-1)
    history = functools.partial(jnp.take_along_axis, indices=beam_bk[..., None], axis=1)
    tokens_bkc = history(tokens_bwc).at[:, :, i].set(token_bk)
    logps_bkc = history(logps_bwc).at[:, :, i].set(tok_logp_bk)
    return score_bk, beam_bk, token_bk, tokens_bkc, logps_bkc


def _merge_finished(fin, new):
    """Keeps the `W` best of the finished hypotheses and new ones (by normalised score)."""
    w = fin[0].shape[1]
    both = [jnp.concatenate([f, x], axis=1) for f, x in zip(fin, new)]
    _, keep_bw = jax.lax.top_k(both[0], w)
    return tuple(jnp.take_along_axis(x, keep_bw.reshape(keep_bw.shape + (1,) * (x.ndim - 2)),
                                     axis=1) for x in both)


def _prompts_done(run_score_bw, fin_score_bw, i, config):
    """True where no running beam can still beat the worst kept finished hypothesis.

    Scores only fall as tokens are added, so `s / L^alpha` over the lengths still possible
    bounds every future normalised score (an exact test, not Hugging Face's heuristic).
    """
    best_b = jnp.max(run_score_bw, axis=-1)
    alpha = config.length_penalty
    bound_b = jnp.maximum(_normalise(best_b, i + 1, alpha),
                          _normalise(best_b, config.max_new_tokens, alpha))
    return (bound_b <= jnp.min(fin_score_bw, axis=-1)) | (best_b == NEG_INF)


def beam_loop(step_fn, reorder_fn, logits_qv, state, config: BeamConfig, pad_id: int = 0):
    """Beam search on any policy whose rows are `W` copies of each prompt (row `b * W + w`).

    Per step every running beam is extended by every token; of the best `k` extensions, those
    ending in a stop token within the top `W` become finished hypotheses and the best `W` others
    keep running (Hugging Face's rule). Returns jax arrays `(tokens_bwc, logps_bwc, lengths_bw,
    scores_bw, sum_logps_bw)`, best first.
    """
    w, c, alpha = config.num_beams, config.max_new_tokens, config.length_penalty
    q, v = logits_qv.shape
    b = q // w
    k = min(w * (1 + len(config.stop_ids)), w * v)
    stop_ids = jnp.asarray(config.stop_ids or (-1,), jnp.int32)
    run = (jnp.full((b, w), NEG_INF).at[:, 0].set(0.0),  # one live beam: no duplicates
           jnp.full((b, w, c), pad_id, jnp.int32), jnp.zeros((b, w, c), jnp.float32))
    fin = (jnp.full((b, w), NEG_INF), jnp.full((b, w), NEG_INF),
           jnp.full((b, w, c), pad_id, jnp.int32), jnp.zeros((b, w, c)),
           jnp.zeros((b, w), jnp.int32))

    def body(carry):
        i, state, logits_qv, run, fin, _ = carry
        score_bk, beam_bk, token_bk, tokens_bkc, logps_bkc = _expand(run, logits_qv, i, w, k)
        stop_bk = jnp.isin(token_bk, stop_ids)
        rank_k = jnp.arange(k)
        ends_bk = stop_bk & (rank_k < w) & jnp.isfinite(score_bk)
        fin = _merge_finished(fin, (
            jnp.where(ends_bk, _normalise(score_bk, i + 1, alpha), NEG_INF),
            score_bk, tokens_bkc, logps_bkc, jnp.full(score_bk.shape, i + 1, jnp.int32)))
        # The first W extensions that do not stop keep running.
        pick_bw = jnp.argsort(jnp.where(stop_bk, rank_k + k, rank_k), axis=-1)[:, :w]
        take = functools.partial(jnp.take_along_axis, indices=pick_bw, axis=1)
        run = (take(score_bk), jnp.take_along_axis(tokens_bkc, pick_bw[..., None], axis=1),
               jnp.take_along_axis(logps_bkc, pick_bw[..., None], axis=1))
        rows_q = (jnp.arange(b)[:, None] * w + take(beam_bk)).reshape(q)
        logits_qv, state = step_fn(reorder_fn(state, rows_q), take(token_bk).reshape(q))
        done = jnp.all(_prompts_done(run[0], fin[0], i, config))
        return i + 1, state, logits_qv, run, fin, done

    def cond(carry):
        return (carry[0] < c) & ~carry[5]

    carry = (jnp.int32(0), state, logits_qv, run, fin, jnp.bool_(False))
    i, _, _, run, fin, _ = jax.lax.while_loop(cond, body, carry)
    length_bw = jnp.full((b, w), i, jnp.int32)
    fin = _merge_finished(fin, (_normalise(run[0], length_bw, alpha), run[0], run[1], run[2],
                                length_bw))
    score_bw, sum_bw, tokens_bwc, logps_bwc, length_bw = fin
    mask_bwc = jnp.arange(c) < length_bw[..., None]
    return (jnp.where(mask_bwc, tokens_bwc, pad_id), jnp.where(mask_bwc, logps_bwc, 0.0),
            length_bw, score_bw, sum_bw)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "pad_id"))
def _beam_decode(graphdef, params, tokens_bt, positions_bt, segment_ids_bt, *, config, pad_id):
    model = nnx.merge(graphdef, params)
    cache_length = tokens_bt.shape[1] + config.max_new_tokens
    logits_bv, state = gen.prefill(model, tokens_bt, positions_bt, segment_ids_bt, cache_length)
    # Prefill once per prompt, then copy the rows into W beams.
    rows_q = jnp.repeat(jnp.arange(tokens_bt.shape[0]), config.num_beams)
    state = gen.reorder_state(state, rows_q)
    return beam_loop(functools.partial(gen.model_step, model), gen.reorder_state,
                     logits_bv[rows_q], state, config, pad_id)


def beam_search(model, prompts: Sequence[Sequence[int]], config: BeamConfig, *,
                ref_model=None, beta: float = 0.1, pad_id: int = 0) -> BeamResult:
    """Likelihood beam search for a batch of token-id prompts, with a KV cache.

    With `ref_model`, the beams are scored by the reference in one batched forward and
    `rewards_bw = beta * (sum logp - sum logp_ref)` (search on the implicit reward,
    "From r to Q*").
    """
    tokens_bt, positions_bt, segment_ids_bt = gen.left_pad(prompts, pad_id)
    graphdef, params = nnx.split(model)
    out = jax.device_get(_beam_decode(graphdef, params, tokens_bt, positions_bt, segment_ids_bt,
                                      config=config, pad_id=pad_id))
    tokens_bwc, logps_bwc, lengths_bw, scores_bw, sum_bw = out
    mask_bwc = (np.arange(config.max_new_tokens) < lengths_bw[..., None]).astype(np.int32)
    rewards_bw = None
    if ref_model is not None:
        ref_logps_bwc = completion_logps(ref_model, Candidates(
            list(prompts), tokens_bwc, mask_bwc), pad_id=pad_id)
        rewards_bw = beta * (sum_bw - (ref_logps_bwc * mask_bwc).sum(-1))
    return BeamResult(tokens_bwc, logps_bwc, mask_bwc, lengths_bw, scores_bw, sum_bw, rewards_bw)


# ---------------------------------------------------------------- best-of-N and rejection sampling


def sample_candidates(model, prompts, n: int, config: gen.SamplingConfig, rng=0,
                      pad_id: int = 0) -> Candidates:
    """`n` samples per prompt from `model` as `Candidates` (`[B, N, C]` arrays)."""
    rows = [list(p) for p in prompts for _ in range(n)]
    out = gen.generate(model, rows, config, rng=rng, pad_id=pad_id)
    shape = (len(prompts), n, -1)
    return Candidates(list(prompts), out.tokens_bn.reshape(shape), out.mask_bn.reshape(shape),
                      out.logps_bn.reshape(shape))


def best_of_n_select(scores_bn):
    """Index of the best-scoring candidate per prompt (the first on ties)."""
    return np.argmax(np.asarray(scores_bn), axis=-1)


class Selection(NamedTuple):
    """Chosen completions per prompt (`k = 1` for best-of-N) with all candidates and scores."""

    tokens_bkc: np.ndarray
    mask_bkc: np.ndarray
    index_bk: np.ndarray
    candidates: Candidates
    scores_bn: np.ndarray


def _select(candidates, scores_bn, index_bk):
    take = lambda x: np.take_along_axis(x, index_bk[..., None], axis=1)  # noqa: E731
    return Selection(take(candidates.tokens_bnc), take(candidates.mask_bnc), index_bk,
                     candidates, np.asarray(scores_bn))


def best_of_n(model, prompts, scorer, n: int, config: gen.SamplingConfig, rng=0,
              pad_id: int = 0) -> Selection:
    """Best-of-N: sample `n` completions per prompt, keep the one `scorer` rates highest."""
    candidates = sample_candidates(model, prompts, n, config, rng, pad_id)
    scores_bn = np.asarray(scorer(candidates))
    return _select(candidates, scores_bn, best_of_n_select(scores_bn)[:, None])


@functools.partial(jax.jit, static_argnames=("num_accept",))
def rso_accept(rewards_bn, rng, beta, *, num_accept: int):
    """Statistical rejection sampling (RSO): accepted indices `[B, K]`.

    Per prompt, until `K` are accepted: `M` = max reward among the remaining candidates; each
    remaining candidate, in order, is accepted with probability `exp((r - M)/beta)` until `K`
    are in; accepted ones are removed. The maximum is always accepted, so `K` rounds suffice.
    Indices come in acceptance order; needs `N >= K`.
    """
    rewards_bn = jnp.asarray(rewards_bn, jnp.float32)
    b, n = rewards_bn.shape
    if num_accept > n:
        raise ValueError(f"rso_accept needs at least {num_accept} candidates, got {n}")

    def one_round(carry, rng_i):
        remaining_bn, count_b, order_bn = carry
        max_b1 = jnp.max(jnp.where(remaining_bn, rewards_bn, NEG_INF), axis=-1, keepdims=True)
        prob_bn = jnp.exp(jnp.minimum(rewards_bn - max_b1, 0.0) / beta)
        accept_bn = remaining_bn & (jax.random.uniform(rng_i, (b, n)) < prob_bn)
        rank_bn = jnp.cumsum(accept_bn, axis=-1) - 1
        accept_bn &= rank_bn < (num_accept - count_b)[:, None]
        order_bn = jnp.where(accept_bn, count_b[:, None] + rank_bn, order_bn)
        return (remaining_bn & ~accept_bn, count_b + accept_bn.sum(-1), order_bn), None

    carry = (jnp.ones((b, n), bool), jnp.zeros((b,), jnp.int32), jnp.full((b, n), n, jnp.int32))
    (_, _, order_bn), _ = jax.lax.scan(one_round, carry, jax.random.split(rng, num_accept))
    return jnp.argsort(order_bn, axis=-1)[:, :num_accept]


def rejection_sample(model, prompts, scorer, n: int, num_accept: int, config: gen.SamplingConfig,
                     beta: float = 0.5, rng=0, pad_id: int = 0) -> Selection:
    """RSO: `n` samples per prompt from `model`, `num_accept` kept by `rso_accept`."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    sample_rng, accept_rng = jax.random.split(rng)
    candidates = sample_candidates(model, prompts, n, config, sample_rng, pad_id)
    scores_bn = np.asarray(scorer(candidates))
    index_bk = np.asarray(rso_accept(scores_bn, accept_rng, beta, num_accept=num_accept))
    return _select(candidates, scores_bn, index_bk)


# ---------------------------------------------------------------- guided decoding


def combine_logits(logits_list, weights):
    """`sum_i w_i log_softmax(z_i)` in float32: a product of experts over the vocabulary."""
    return sum(w * jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
               for z, w in zip(logits_list, weights))


def combined_policy(policies, weights):
    """`(logits_bv, state, step_fn)` of the weighted product of several step-function policies.

    `policies` are `(logits_bv, state, step_fn)` triples over the same rows; the state is the
    tuple of theirs. Guided decoding is `weights = (1, b, -b)` over (base, dpo, ref).
    """
    step_fns = [p[2] for p in policies]

    def step_fn(states, token_b):
        outs = [f(s, token_b) for f, s in zip(step_fns, states)]
        return combine_logits([o[0] for o in outs], weights), tuple(o[1] for o in outs)

    logits_bv = combine_logits([p[0] for p in policies], weights)
    return logits_bv, tuple(p[1] for p in policies), step_fn


@functools.partial(jax.jit, static_argnames=("graphdefs", "config", "pad_id"))
def _guided_decode(graphdefs, params, tokens_bt, positions_bt, segment_ids_bt, rng, beta, *,
                   config, pad_id):
    cache_length = tokens_bt.shape[1] + config.max_new_tokens
    policies = []
    for graphdef, p in zip(graphdefs, params):
        model = nnx.merge(graphdef, p)
        logits_bv, state = gen.prefill(model, tokens_bt, positions_bt, segment_ids_bt, cache_length)
        policies.append((logits_bv, state, functools.partial(gen.model_step, model)))
    logits_bv, state, step_fn = combined_policy(policies, (1.0, beta, -beta))
    return gen.sample_loop(step_fn, logits_bv, state, config, rng, pad_id)


def guided_generate(base, dpo, ref, prompts, config: gen.SamplingConfig, beta: float = 1.0,
                    rng=0, pad_id: int = 0) -> gen.Generation:
    """Samples from `pi(a|s) ∝ pi_base(a|s) (pi_dpo(a|s)/pi_ref(a|s))^beta` ("From r to Q*").

    The three models share the tokenizer; each keeps its own KV cache. `logps_bn` are under the
    combined, renormalised policy.
    """
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    tokens_bt, positions_bt, segment_ids_bt = gen.left_pad(prompts, pad_id)
    splits = [nnx.split(m) for m in (base, dpo, ref)]
    graphdefs, params = tuple(s[0] for s in splits), tuple(s[1] for s in splits)
    out = jax.device_get(_guided_decode(graphdefs, params, tokens_bt, positions_bt, segment_ids_bt,
                                        rng, beta, config=config, pad_id=pad_id))
    return gen.Generation(*out, out[3].sum(axis=-1))


# ---------------------------------------------------------------- value-guided decoding (VAS)


def value_adjusted_logits(model, head, state, logits_bv, beta, top_k: int):
    """Adds `beta (V(s || a) - mean_topk V)` to the `top_k` most likely tokens' logits.

    The `top_k` candidate tokens go through the model in one call on the KV cache as sibling
    branches (branch ids 1..k: each sees the cached prefix and itself, never the others); the
    returned cache is dropped, so nothing is committed. The cache needs `top_k` spare slots.
    """
    cache, positions_b = state
    logits_bv = logits_bv.astype(jnp.float32)
    _, ids_bk = jax.lax.top_k(logits_bv, top_k)
    b = ids_bk.shape[0]
    hidden_bkd, _ = model(
        ids_bk, jnp.broadcast_to(positions_b[:, None], (b, top_k)), jnp.ones((b, top_k), jnp.int32),
        jnp.broadcast_to(jnp.arange(1, top_k + 1, dtype=jnp.int32), (b, top_k)),
        cache=cache, return_hidden=True)
    values_bk = head(hidden_bkd)
    bonus_bk = beta * (values_bk - values_bk.mean(axis=-1, keepdims=True))
    return logits_bv.at[jnp.arange(b)[:, None], ids_bk].add(bonus_bk)


@functools.partial(jax.jit, static_argnames=("graphdef", "head_graphdef", "config", "pad_id",
                                             "top_k"))
def _value_guided_decode(graphdef, params, head_graphdef, head_params, tokens_bt, positions_bt,
                         segment_ids_bt, rng, beta, *, config, pad_id, top_k):
    model = nnx.merge(graphdef, params)
    head = nnx.merge(head_graphdef, head_params)
    cache_length = tokens_bt.shape[1] + config.max_new_tokens + top_k
    adjust = functools.partial(value_adjusted_logits, model, head, beta=beta, top_k=top_k)
    logits_bv, state = gen.prefill(model, tokens_bt, positions_bt, segment_ids_bt, cache_length)

    def step_fn(state, token_b):
        logits_bv, state = gen.model_step(model, state, token_b)
        return adjust(state, logits_bv), state

    return gen.sample_loop(step_fn, adjust(state, logits_bv), state, config, rng, pad_id)


def value_guided_generate(model, head, prompts, config: gen.SamplingConfig, beta: float = 1.0,
                          top_k: int = 20, rng=0, pad_id: int = 0) -> gen.Generation:
    """VAS decoding: samples with the base logits plus the value bonus of `value_adjusted_logits`.

    `head` is a `ValueHead` on `model`'s final hidden states (trained by
    `prefopt_jax.sampling.value.train_value_head`); `logps_bn` are under the adjusted policy.
    """
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    top_k = min(top_k, model.config.vocab_size)
    tokens_bt, positions_bt, segment_ids_bt = gen.left_pad(prompts, pad_id)
    graphdef, params = nnx.split(model)
    head_graphdef, head_params = nnx.split(head)
    out = jax.device_get(_value_guided_decode(
        graphdef, params, head_graphdef, head_params, tokens_bt, positions_bt, segment_ids_bt, rng,
        beta, config=config, pad_id=pad_id, top_k=top_k))
    return gen.Generation(*out, out[3].sum(axis=-1))

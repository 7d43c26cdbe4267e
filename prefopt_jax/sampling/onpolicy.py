"""On-policy preference data: sample k replies per prompt, score them, select pairs, write rows.

Shape letters: `b` prompts, `n` (= k) candidates per prompt, `c` completion positions, `a`
accepted (RSO) candidates, `p` pairs.

Used by `prefopt data build-pairs` (rows as JSONL in the standard preference format) and by the
iterative loop (`online.iterative`, token-level `TokenizedData` with SPPO win probabilities).
Selection modes: `best_vs_worst` (one pair per prompt), `all_pairs` (every strictly ordered
pair), `rso` (statistical rejection sampling picks `accept` candidates, then best vs worst
among them). Prompts whose candidates all tie give no pair.
"""

from __future__ import annotations

import json
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from prefopt_jax.data.tokenized import TokenizedData, from_lists
from prefopt_jax.errors import DataSourceError
from prefopt_jax.sampling import generate as gen
from prefopt_jax.sampling import search
from prefopt_jax.sampling.scorers import Candidates

MODES = ("best_vs_worst", "all_pairs", "rso")


class Scored(NamedTuple):
    """Candidates with their scores `[B, N]` and the pairs `(b, chosen n, rejected n)`."""

    candidates: Candidates
    scores_bn: np.ndarray
    pairs: list


def select_pairs(scores_bn, mode: str = "best_vs_worst", accepted_ba=None) -> list:
    """`(b, i_w, i_l)` triples with `score[i_w] > score[i_l]` (ties give no pair)."""
    scores_bn = np.asarray(scores_bn, np.float64)
    pairs = []
    for b, row in enumerate(scores_bn):
        pool = np.arange(len(row)) if accepted_ba is None else np.asarray(accepted_ba[b])
        if mode == "all_pairs":
            pairs += [(b, int(i), int(j)) for i in pool for j in pool if row[i] > row[j]]
            continue
        if mode not in ("best_vs_worst", "rso"):
            raise ValueError(f"unknown pair selection {mode!r}; choose one of {MODES}")
        best, worst = pool[np.argmax(row[pool])], pool[np.argmin(row[pool])]
        if row[best] > row[worst]:
            pairs.append((b, int(best), int(worst)))
    return pairs


def win_probs(scores_bn, scale: float | None = 1.0) -> np.ndarray:
    """`P(y_i beats the others) = mean_{j != i} P(y_i > y_j)` per candidate, `[B, N]`.

    `P(y_i > y_j) = sigma(scale (r_i - r_j))` (Bradley-Terry on the scores), or with
    `scale=None` the hard `1[r_i > r_j] + 0.5 1[r_i = r_j]`: SPPO's estimate of the win rate
    against the current policy from its own k samples.
    """
    s_bn = np.asarray(scores_bn, np.float64)
    diff_bnn = s_bn[:, :, None] - s_bn[:, None, :]
    if scale is None:
        p_bnn = (diff_bnn > 0) + 0.5 * (diff_bnn == 0)
    else:
        p_bnn = 1.0 / (1.0 + np.exp(-scale * diff_bnn))
    n = s_bn.shape[1]
    off_bnn = p_bnn * (1.0 - np.eye(n))[None]
    return (off_bnn.sum(-1) / max(n - 1, 1)).astype(np.float32)


def sample_and_score(model, prompts: Sequence[Sequence[int]], scorer: Callable, k: int,
                     config: gen.SamplingConfig, *, mode: str = "best_vs_worst",
                     accept: int = 2, rso_beta: float = 0.5, seed: int = 0,
                     pad_id: int = 0) -> Scored:
    """k samples per prompt from `model`, scored by `scorer`, and the selected pairs."""
    rng = jax.random.key(seed)
    sample_rng, accept_rng = jax.random.split(rng)
    candidates = search.sample_candidates(model, prompts, k, config, sample_rng, pad_id)
    scores_bn = np.asarray(scorer(candidates), np.float32)
    accepted = None
    if mode == "rso":
        accepted = np.asarray(search.rso_accept(scores_bn, accept_rng, rso_beta,
                                                num_accept=accept))
    return Scored(candidates, scores_bn, select_pairs(scores_bn, mode, accepted))


def reply_tokens(candidates: Candidates, b: int, n: int) -> np.ndarray:
    """The real tokens of candidate n of prompt b (stop token kept)."""
    return np.asarray(candidates.tokens_bnc[b, n])[np.asarray(candidates.mask_bnc[b, n]) > 0]


def to_tokenized(scored: Scored, win_scale: float | None = None,
                 with_win_probs: bool = False) -> TokenizedData:
    """Pairs as paired `TokenizedData` (prompt tokens as sampled) with scores and, for SPPO and
    DNO, the win probabilities `win_prob_chosen` / `win_prob_rejected` (the `win_probs` need)."""
    cands, pairs = scored.candidates, scored.pairs
    if not pairs:
        raise ValueError("no pair: every prompt's candidates tied under the scorer")
    prompts = [list(cands.prompts[b]) for b, _, _ in pairs]
    completions = [reply_tokens(cands, b, i) for b, w, l in pairs for i in (w, l)]
    take = lambda x_bn, side: np.array([x_bn[p[0], p[side]] for p in pairs], np.float32)  # noqa
    fields = {"score_chosen": take(scored.scores_bn, 1),
              "score_rejected": take(scored.scores_bn, 2)}
    if with_win_probs:
        wp_bn = win_probs(scored.scores_bn, win_scale)
        fields["win_prob_chosen"] = take(wp_bn, 1)
        fields["win_prob_rejected"] = take(wp_bn, 2)
    return from_lists("paired", 2, prompts, completions, np.arange(len(pairs)), fields)


def to_rows(scored: Scored, prompt_rows: Sequence, tokenizer) -> list[dict]:
    """Pairs as standard preference rows: the prompt as given, replies decoded in its style."""
    rows = []
    for b, w, l in scored.pairs:
        prompt = prompt_rows[b]
        texts = [tokenizer.decode(reply_tokens(scored.candidates, b, i).tolist(),
                                  skip_special_tokens=True).strip() for i in (w, l)]
        if not isinstance(prompt, str):
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        rows.append({"prompt": prompt, "chosen": texts[0], "rejected": texts[1],
                     "score_chosen": float(scored.scores_bn[b, w]),
                     "score_rejected": float(scored.scores_bn[b, l])})
    return rows


def write_jsonl(rows: Sequence[dict], path: str) -> None:
    """One JSON object per line."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Prompt token ids as the data pipeline renders them (chat template for messages, else BOS +
    text), so replies sampled here line up with how `prefopt train` tokenises the pairs."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        return ids if bos is None or ids[:1] == [bos] else [bos] + ids
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def read_prompts(path: str, limit: int | None = None) -> list:
    """The `prompt` column of a json/jsonl/parquet/csv file or dataset (any preference format)."""
    from prefopt_jax.data import open_source

    src = open_source(path)
    rows = src.rows(0, len(src))
    prompts = [r["prompt"] for r in rows if r.get("prompt") is not None]
    if not prompts:
        raise DataSourceError(f"{path}: no row has a 'prompt' field")
    return prompts[:limit] if limit else prompts

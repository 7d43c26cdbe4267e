"""Tokenisation of records: chat template or plain text, length limits, truncation counts.

Conversational records: the prompt is rendered with add_generation_prompt=True and the whole
conversation without; the completion is the text after the prompt (an error if the template does
not render the prompt as a prefix). Plain text: BOS + prompt, then completion + EOS. Prompt and
completion are tokenised apart, so every completion of an example shares the same prompt tokens
(which prefix sharing relies on) and the completion mask covers completion tokens only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np

from prefopt_jax.data.formats import DataError, Record
from prefopt_jax.data.report import DataReport
from prefopt_jax.data.tokenized import FIELD_DEFAULTS, TokenizedData, from_lists, side_names

PROMPT_MODES = ("error", "keep_start", "keep_end", "drop")
COMPLETION_MODES = ("keep_start", "drop", "error")
BATCH = 1024


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Length limits (in tokens) and what to do with what exceeds them.

    prompt_truncation: error (default: a long prompt is bad input), keep_start, keep_end or drop.
    completion_truncation: keep_start (default: cut the end off), drop or error.
    max_length bounds prompt + each completion; the prompt keeps at least one completion token.
    """

    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    max_length: int | None = None
    prompt_truncation: str = "error"
    completion_truncation: str = "keep_start"
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self):
        if self.prompt_truncation not in PROMPT_MODES:
            raise ValueError(f"prompt_truncation must be one of {PROMPT_MODES}")
        if self.completion_truncation not in COMPLETION_MODES:
            raise ValueError(f"completion_truncation must be one of {COMPLETION_MODES}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("max_length must leave room for a prompt and a completion token")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokens: vocabulary, special tokens and chat template."""
    vocab = sorted(tokenizer.get_vocab().items())
    parts = [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), vocab,
             getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id,
             tokenizer.eos_token_id, sorted(map(str, tokenizer.all_special_tokens))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def render(record: Record, tokenizer) -> tuple[str, list]:
    """The prompt text and each completion's text (None for filler), chat template applied."""
    if isinstance(record.prompt, str):
        return record.prompt, list(record.completions)
    prompt = tokenizer.apply_chat_template(record.prompt, tokenize=False,
                                           add_generation_prompt=True)
    texts = []
    for j, messages in enumerate(record.completions):
        if messages is None:
            texts.append(None)
            continue
        full = tokenizer.apply_chat_template(record.prompt + messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError(record.index, None, "the chat template does not render the prompt "
                            "(with add_generation_prompt) as a prefix of the conversation, so "
                            "completion tokens cannot be told apart")
        texts.append(full[len(prompt):])
    return prompt, texts


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts without added special tokens, in batches (fast tokenizers)."""
    out = []
    for start in range(0, len(texts), BATCH):
        chunk = texts[start:start + BATCH]
        out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else [])
    return out


def add_special(prompt: list[int], completions: list, tokenizer, config: TokenizeConfig):
    """BOS before a plain-text prompt and EOS after each plain-text completion (as TRL does)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if config.add_bos and bos is not None and prompt[:1] != [bos]:
        prompt = [bos] + prompt
    if config.add_eos and eos is not None:
        completions = [c if c is None or c[-1:] == [eos] else c + [eos] for c in completions]
    return prompt, completions


def apply_limits(index: int, prompt: list[int], completions: list, names: tuple,
                 config: TokenizeConfig, report: DataReport):
    """Truncates or drops per config; returns (prompt, completions), or None when dropped."""
    inf = math.inf
    max_length = config.max_length or inf
    prompt_limit = min(config.max_prompt_length or inf, max_length - 1)
    if len(prompt) > prompt_limit:
        mode = config.prompt_truncation
        if mode == "error":
            raise DataError(index, "prompt", f"prompt of {len(prompt)} tokens is longer than the "
                            f"limit {prompt_limit} (max_prompt_length={config.max_prompt_length},"
                            f" max_length={config.max_length}); choose prompt_truncation "
                            "keep_start, keep_end or drop to accept such rows")
        if mode == "drop":
            report.counts["dropped_prompt_too_long"] += 1
            return None
        report.counts["prompts_truncated"] += 1
        report.counts["prompt_tokens_cut"] += len(prompt) - prompt_limit
        prompt = prompt[:prompt_limit] if mode == "keep_start" else prompt[-prompt_limit:]
    limit = min(config.max_completion_length or inf, max_length - len(prompt))
    out = []
    for name, tokens in zip(names, completions):
        if tokens is not None and len(tokens) > limit:
            if config.completion_truncation == "error":
                raise DataError(index, name, f"completion of {len(tokens)} tokens is longer "
                                f"than the limit {limit}")
            if config.completion_truncation == "drop":
                report.counts["dropped_completion_too_long"] += 1
                return None
            report.counts["completions_truncated"] += 1
            report.counts["completion_tokens_cut"] += len(tokens) - limit
            tokens = tokens[:limit]
        out.append(tokens)
    return prompt, out


def field_arrays(records: list[Record], kind: str, k: int) -> dict:
    """Per-example field arrays ([n], or [n, K] for listwise scores); defaults fill the gaps."""
    names = sorted({name for r in records for name in r.fields})
    out = {}
    for name in names:
        default = FIELD_DEFAULTS.get(name, 0.0 if name != "scores" else [math.nan] * k)
        out[name] = np.array([r.fields.get(name, default) for r in records], np.float32)
    return out


def tokenize_records(records: list[Record], tokenizer, config: TokenizeConfig, kind: str,
                     k: int, report: DataReport, skip_bad_rows: bool = False) -> TokenizedData:
    """Tokenises normalised records into TokenizedData, counting truncation and drops."""
    names = side_names(kind, k)
    rendered, kept = [], []
    for record in records:
        try:
            rendered.append(render(record, tokenizer))
            kept.append(record)
        except DataError as err:
            if not skip_bad_rows:
                raise
            report.skip(err)
    prompts = encode(tokenizer, [p for p, _ in rendered])
    flat = encode(tokenizer, [c for _, cs in rendered for c in cs if c is not None])
    flat_iter = iter(flat)
    final, prompt_ids, completion_ids = [], [], []
    for record, prompt, (_, texts) in zip(kept, prompts, rendered):
        completions = [None if t is None else next(flat_iter) for t in texts]
        if isinstance(record.prompt, str):
            prompt, completions = add_special(prompt, completions, tokenizer, config)
        try:
            limited = apply_limits(record.index, prompt, completions, names, config, report)
        except DataError as err:
            if not skip_bad_rows:
                raise
            report.skip(err)
            continue
        if limited is None:
            continue
        final.append(record)
        prompt_ids.append(limited[0])
        completion_ids.extend([] if c is None else c for c in limited[1])
    report.counts["examples"] = len(final)
    return from_lists(kind, k, prompt_ids, completion_ids, [r.index for r in final],
                      field_arrays(final, kind, k))

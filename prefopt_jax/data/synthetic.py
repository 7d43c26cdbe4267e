"""Synthetic preference data for tests and benchmarks: a tiny tokenizer, rows, and length mixes.

Everything here is a pure function of its seed and needs no download.
"""

from __future__ import annotations

import numpy as np

from prefopt_jax.data.tokenized import TokenizedData, from_lists, unpair

WORDS = ("the cat dog sat on a mat and ran to big small red blue green house tree river sun "
         "moon star is was very quite happy sad good bad answer question why how what yes no "
         "I you we they it not maybe always never helpful assistant human").split()
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|developer|>", "<|tool|>"]


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on WORDS, with BOS/EOS/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4 + WORDS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=TINY_SPECIAL[3:], chat_template=TINY_CHAT_TEMPLATE)


def words(rng: np.random.Generator, n: int) -> str:
    """n random words."""
    return " ".join(rng.choice(WORDS, size=max(int(n), 1)))


def text_lengths(rng: np.random.Generator, median: float, size=None) -> np.ndarray:
    """Long-tailed (log-normal) word counts around a median."""
    return np.maximum(1, rng.lognormal(np.log(median), 0.8, size=size)).astype(int)


def synthetic_rows(n: int, fmt: str = "preference", conversational: bool = False,
                   seed: int = 0, prompt_words: float = 8, completion_words: float = 12
                   ) -> list[dict]:
    """n valid rows of a format (see formats.FORMATS), with long-tailed lengths (median words)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = f"q{i} " + words(rng, text_lengths(rng, prompt_words))
        texts = [f"a{i}.{j} " + words(rng, text_lengths(rng, completion_words))
                 for j in range(4)]
        rows.append(row_of(fmt, prompt, texts, rng, conversational))
    return rows


def row_of(fmt: str, prompt: str, texts: list[str], rng, conversational: bool) -> dict:
    """One row of a format from a prompt and candidate answers."""
    def user(t):
        return [{"role": "user", "content": t}] if conversational else t

    def answer(t):
        return [{"role": "assistant", "content": t}] if conversational else t

    if fmt == "implicit_preference":
        if conversational:
            return {"chosen": user(prompt) + answer(texts[0]),
                    "rejected": user(prompt) + answer(texts[1])}
        head = f"\n\nHuman: {prompt}\n\nAssistant:"
        return {"chosen": f"{head} {texts[0]}", "rejected": f"{head} {texts[1]}"}
    if fmt == "unpaired":
        return {"prompt": user(prompt), "completion": answer(texts[0]),
                "label": bool(rng.integers(2))}
    if fmt == "ranked":
        return {"prompt": user(prompt), "completions": [answer(t) for t in texts],
                "scores": [float(s) for s in rng.permutation(len(texts))]}
    row = {"prompt": user(prompt), "chosen": answer(texts[0]), "rejected": answer(texts[1])}
    if fmt == "triple":
        row["gold"] = answer(texts[2])
    return row


def synthetic_tokenized(n: int, seed: int = 0, prompt_median: float = 120.0,
                        completion_median: float = 220.0, sigma: float = 1.0,
                        max_length: int = 2048, vocab_size: int = 32000,
                        k: int = 2, kind: str = "paired") -> TokenizedData:
    """Examples of `k` completions with log-normal prompt and completion lengths, like real
    preference data (paired by default; `kind` names what the K completions are).

    Prompts are capped at half of max_length and each completion at what is left, as a
    truncating tokenizer would leave them.
    """
    rng = np.random.default_rng(seed)
    lp_n = np.clip(rng.lognormal(np.log(prompt_median), sigma, n), 4, max_length // 2).astype(int)
    lc_nk = np.clip(rng.lognormal(np.log(completion_median), sigma, (n, k)), 2, None).astype(int)
    lc_nk = np.minimum(lc_nk, max_length - lp_n[:, None])
    prompts = [rng.integers(1, vocab_size, size=m) for m in lp_n]
    completions = [rng.integers(1, vocab_size, size=m) for m in lc_nk.reshape(-1)]
    return from_lists(kind, k, prompts, completions, np.arange(n), {})


# Examples of the `tiny` data source, by the kind of data an objective reads.
TINY_KINDS = ("paired", "triple", "unpaired", "listwise")
TINY_LIST_SIZE = 4


def tiny_data(kind: str, n: int, seed: int, vocab_size: int,
              win_probs: bool = False) -> TokenizedData:
    """The synthetic `tiny` source: `n` short examples of a kind (tokens drawn from the vocabulary).

    paired (chosen, rejected); triple (chosen, rejected, gold); unpaired (the first n of
    `ceil(n / 2)` pairs split into a desirable and an undesirable example); listwise (lists of
    TINY_LIST_SIZE with random scores). `win_probs` adds win-probability columns to paired and
    triple data (SPPO, DNO).
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"no tiny data of kind {kind!r}; known: {TINY_KINDS}")
    k = {"paired": 2, "unpaired": 2, "triple": 3, "listwise": TINY_LIST_SIZE}[kind]
    data = synthetic_tokenized(-(-n // 2) if kind == "unpaired" else n, seed=seed,
                               prompt_median=6, completion_median=8, max_length=48,
                               vocab_size=vocab_size, k=k,
                               kind="paired" if kind == "unpaired" else kind)
    rng = np.random.default_rng([seed, 1])
    if kind == "listwise":
        data.fields["scores"] = np.stack([rng.permutation(k) for _ in range(n)]).astype(np.float32)
    if win_probs and kind in ("paired", "triple"):
        high_n, low_n = np.sort(rng.uniform(0.05, 0.95, (2, n)), axis=0)[::-1]
        data.fields.update(win_prob_chosen=high_n.astype(np.float32),
                           win_prob_rejected=low_n.astype(np.float32))
    return unpair(data).select(np.arange(n)) if kind == "unpaired" else data


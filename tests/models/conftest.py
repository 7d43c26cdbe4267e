"""Fixtures for model tests: tiny random models, tiny transformers models, GGUF file writing.

The real SmolLM2 (``smollm2`` fixture, loaded once per session) and the ``real_model`` marker
live in tests/conftest.py, shared with the other rooms.
"""

import dataclasses
import types

import gguf
import jax
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import ModelConfig, Transformer
from prefopt_jax.models.hf import model_from_params

HF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rope_theta=10000.0)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, max_position_embeddings=256)


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.05) -> dict:
    """Random parameters (numpy, so no per-shape compiles) in our unscanned layout.

    Norm scales are drawn near 1 and biases non-zero, so that every parameter matters.
    """
    abstract = nnx.eval_shape(lambda: Transformer(dataclasses.replace(config, scan_layers=False),
                                                  rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(abstract))
    leaves, treedef = jax.tree.flatten_with_path(pure)
    rng = np.random.default_rng(seed)
    values = []
    for path, leaf in leaves:
        noise = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm = getattr(path[-1], "key", None) == "scale"
        values.append(noise + 1.0 if is_norm else noise)
    return jax.tree.unflatten(treedef, values)


def build_tiny(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with random parameters; ``overrides`` are ModelConfig fields."""
    config = ModelConfig(**{**TINY, **overrides})
    return model_from_params(config, random_params(config, seed))


@pytest.fixture
def tiny_model():
    """``build_tiny``: ``tiny_model(seed=0, **config_overrides)``."""
    return build_tiny


@pytest.fixture
def tiny_params():
    """``random_params``: ``tiny_params(config, seed=0)``."""
    return random_params


@nnx.jit
def _forward(model, tokens_bt, positions_bt, segment_ids_bt=None, branch_ids_bt=None):
    return model(tokens_bt, positions_bt, segment_ids_bt, branch_ids_bt)


@pytest.fixture(scope="session")
def forward():
    """Jitted ``model(tokens, positions, segment_ids=None, branch_ids=None)``.

    Module-level, so the compiled program is reused by every test with the same config/shapes.
    """
    return _forward


@pytest.fixture
def randomize_torch():
    """A function giving a transformers model random weights (norms near 1, biases non-zero)."""
    import torch

    def randomize(model, seed: int = 0, scale: float = 0.05):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                noise = scale * torch.randn(param.shape, generator=generator)
                param.copy_(noise + 1.0 if "norm" in name else noise)
        return model.eval()

    return randomize


# llama.cpp tensor names of the HF ones, for writing GGUF files the way its converter does.
GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
               "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a HF tensor name."""
    if hf_name in GGUF_GLOBAL:
        return GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{GGUF_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"


def interleave_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: within a head, row 2j+half holds HF row half*Dh/2 + j."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(path, model, arch="llama", quantize=(), drop=(), extra=None, skip_metadata=(),
               tokens=None):
    """Write ``model`` (a transformers model) as a GGUF file; knobs break it on purpose
    (``tokens``: a tokenizer.ggml.tokens list)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    metadata = {"block_count": config.num_hidden_layers, "context_length": 256,
                "embedding_length": config.hidden_size,
                "feed_forward_length": config.intermediate_size,
                "head_count": config.num_attention_heads,
                "head_count_kv": config.num_key_value_heads, "rope_freq_base": 10000.0,
                "layer_norm_rms_eps": config.rms_norm_eps, "vocab_size": config.vocab_size}
    for key, value in metadata.items():
        if key not in skip_metadata:
            getattr(writer, f"add_{key}")(value)
    if tokens is not None:
        writer.add_token_list(tokens)
    heads = {"self_attn.q_proj": config.num_attention_heads,
             "self_attn.k_proj": config.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name, array = gguf_name(hf_name), tensor.float().numpy()
        module = ".".join(hf_name.split(".")[3:-1])
        if arch == "llama" and module in heads:
            array = interleave_heads(array, heads[module])
        if name in drop:
            continue
        if name in quantize:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def gguf_files():
    """GGUF helpers: ``write(path, hf_model, arch=..., quantize=, drop=, extra=, skip_metadata=)``
    writes a file as llama.cpp's converter would; ``name(hf_name)`` is the GGUF tensor name."""
    return types.SimpleNamespace(write=write_gguf, name=gguf_name)


@pytest.fixture
def tiny_hf(randomize_torch):
    """``tiny_hf(config_cls_name, **extra)``: a random tiny transformers model (HF_TINY sizes)."""
    import transformers

    def build(config_cls: str, seed: int = 4, **extra):
        config = getattr(transformers, config_cls)(**{**HF_TINY, **extra})
        return randomize_torch(transformers.AutoModelForCausalLM.from_config(config), seed=seed)

    return build

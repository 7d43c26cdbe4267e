"""`random:NAME` architectures: the released shapes, random weights, clear errors."""

import dataclasses

import jax
import pytest
from flax import nnx

from prefopt_jax.models import Transformer, presets
from prefopt_jax.models.gguf_file import read_gguf_file
from prefopt_jax.models.hf import _gguf_config, builtin_path
from prefopt_jax.train import loop

# Parameter counts of the released checkpoints (their model cards / safetensors headers).
RELEASED_PARAMS = {"smollm2-135m": 134_515_008, "smollm2-1.7b": 1_711_376_384,
                   "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
                   "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_architecture_has_the_released_parameter_count(name):
    config = presets.config(presets.PREFIX + name)
    shapes = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))  # nothing allocated
    assert sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param))) == \
        RELEASED_PARAMS[name]


def test_every_architecture_is_counted():
    assert set(presets.ARCHITECTURES) == set(RELEASED_PARAMS)


def test_smollm2_135m_matches_the_builtin_gguf_metadata():
    path = builtin_path("smollm2-135m-instruct")
    released = _gguf_config(read_gguf_file(path), path)
    ours = presets.config("random:smollm2-135m")
    for field, value in released.items():
        if isinstance(value, float):  # GGUF stores float32
            assert getattr(ours, field) == pytest.approx(value, rel=1e-6), field
        else:
            assert getattr(ours, field) == value, field


def test_llama3_rope_scaling_is_kept():
    config = presets.config("random:llama-3.2-1b")
    assert config.rope_type == "llama3"
    assert config.rope_scaling_dict["factor"] == 32.0
    assert config.head_dim == 64 and config.num_kv_heads == 8


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'llama-9b'.*random:llama-3\.2-1b"):
        presets.config("random:llama-9b")


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="num_layer"):
        presets.config("random:llama-3.2-1b", num_layer=2)


def test_load_model_builds_the_architecture_with_overrides():
    spec = loop.ModelSpec(source="random:smollm2-135m", dtype="bfloat16", param_dtype="float32",
                          overrides=(("num_layers", 1),))
    model, tokenizer = loop.load_model(spec)
    assert tokenizer is None
    assert model.config.num_layers == 1 and model.config.hidden_size == 576
    assert model.config.dtype == "bfloat16" and model.config.param_dtype == "float32"
    assert model.embed[...].shape == (49152, 576)


def test_random_model_with_text_data_names_the_missing_tokenizer():
    spec = dataclasses.replace(loop.DataSpec(), source="data/prefs.jsonl")
    with pytest.raises(ValueError, match=r"prefs\.jsonl.*tokenizer.*'tiny'"):
        loop.make_loader(spec, None, seed=0, vocab_size=61)

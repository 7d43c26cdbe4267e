"""Released architectures by name, with random weights: real sizes without their checkpoints.

``random:NAME`` as a model source (``ModelSpec.source``, ``benchmarks/dpo_step.py --model``)
builds NAME's architecture with random weights, so benchmarks, memory planning and smoke runs at
a real model's size need no download. The shapes are those of the released ``config.json``;
nothing else of the model (weights, tokenizer) is implied. Data for such a model is the
synthetic ``tiny`` source (``DataSpec.source="tiny"``), whose tokens are drawn from the model's
vocabulary.
"""

from __future__ import annotations

from typing import Any

from prefopt_jax.models.transformer import ModelConfig

PREFIX = "random:"

# The `tiny` source: one layer of width 32, for smoke runs and tests (vocabulary of 61 ids).
TINY_VOCAB = 61
TINY = ModelConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=4, num_kv_heads=2, head_dim=8)

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3 = dict(vocab_size=128256, num_kv_heads=8, head_dim=None, rope_theta=500000.0,
               rms_norm_eps=1e-5, max_position_embeddings=131072, model_type="llama")

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the built-in default's shapes.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    # HuggingFaceTB/SmolLM2-1.7B.
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                         num_layers=24, num_heads=32, num_kv_heads=32, rope_theta=130000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    # meta-llama/Llama-3.2-1B: the 1B-class Llama of the GPU benchmark.
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_layers=16,
                         num_heads=32, tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    # meta-llama/Llama-3.2-3B.
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_layers=28,
                         num_heads=24, tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    # meta-llama/Llama-3.1-8B.
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_heads=32, tie_word_embeddings=False,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
}


def is_random(source: str) -> bool:
    return source.startswith(PREFIX)


def tiny_config(**overrides) -> ModelConfig:
    """The tiny model's config with ModelConfig overrides (e.g. scan_layers, dtype)."""
    return ModelConfig(**{**TINY.__dict__, **overrides})


def config(source: str, **overrides) -> ModelConfig:
    """The ModelConfig of ``random:NAME`` (or plain NAME) with ModelConfig overrides applied."""
    name = source[len(PREFIX):] if is_random(source) else source
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} in model source {source!r}; known: "
                         f"{', '.join(PREFIX + k for k in sorted(ARCHITECTURES))}")
    fields = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown} for model source {source!r}")
    return ModelConfig(**{**ARCHITECTURES[name], **overrides})

"""Models: the decoder LM, its sharding rules, and Hugging Face / GGUF import and export."""

from prefopt_jax.models.hf import (CheckpointError, ModelNotFoundError,
                                   UnsupportedArchitectureError, from_pretrained, resolve_source,
                                   save_pretrained)
from prefopt_jax.models.transformer import ModelConfig, Transformer

__all__ = ["CheckpointError", "ModelConfig", "ModelNotFoundError", "Transformer",
           "UnsupportedArchitectureError", "from_pretrained", "resolve_source", "save_pretrained"]

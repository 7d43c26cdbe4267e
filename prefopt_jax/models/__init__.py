"""Models: the decoder LM, its sharding rules, and Hugging Face / GGUF import and export."""

from prefopt_jax.models.hf import (CheckpointError, UnsupportedArchitectureError, from_pretrained,
                                   save_pretrained)
from prefopt_jax.models.transformer import ModelConfig, Transformer

__all__ = ["CheckpointError", "ModelConfig", "Transformer", "UnsupportedArchitectureError",
           "from_pretrained", "save_pretrained"]

"""Which model a run uses, as a frozen spec gin can bind, and loading it (never downloading).

Sources: `tiny` (a small random model for smoke runs and tests), `random:NAME` (a released
architecture with random weights, `models.presets`), a built-in name, a Hugging Face directory
or a `.gguf` file. Random sources are initialised from `ModelSpec.seed`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import presets
from prefopt_jax.models.transformer import ModelConfig, Transformer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model: `tiny` (random, for smoke runs), `random:NAME` (a released architecture with
    random weights, `models.presets`), a built-in name, a HF directory or .gguf.

    `overrides` are ModelConfig fields (e.g. remat_policy, scan_layers) as (name, value) pairs;
    `seed` initialises the random sources (tiny, random:NAME).
    """

    source: str = "tiny"
    dtype: str = "float32"
    param_dtype: str | None = None
    overrides: tuple = ()
    lora: lora_lib.LoraConfig | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(sorted(dict(self.overrides).items())))

    @property
    def is_random(self) -> bool:
        """Whether the weights are random (no files, no tokenizer)."""
        return self.source == "tiny" or presets.is_random(self.source)


def load_model(spec: ModelSpec):
    """(model, tokenizer): a random model, or weights from disk (never downloaded)."""
    overrides = dict(spec.overrides)
    dtype = jnp.dtype(spec.dtype)
    if spec.param_dtype:
        overrides["param_dtype"] = jnp.dtype(spec.param_dtype)
    if spec.is_random:
        param_dtype = overrides.pop("param_dtype", dtype)
        if spec.source == "tiny":
            config = presets.tiny_config(dtype=dtype, param_dtype=param_dtype, **overrides)
        else:
            config = presets.config(spec.source, dtype=dtype, param_dtype=param_dtype,
                                    **overrides)
        return random_model(config, spec.seed), None
    from prefopt_jax.models.hf import from_pretrained
    return from_pretrained(spec.source, dtype=dtype, **overrides)


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model of `config` with random weights drawn from `seed`."""
    return Transformer(config, rngs=nnx.Rngs(seed))

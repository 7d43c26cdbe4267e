"""Which model a run uses, as a frozen spec gin can bind, and loading it.

Nothing is downloaded, except a hub id missing from the local cache while ``HF_HUB_OFFLINE`` is
unset (``models.hub``).

Sources: `tiny` (a small random model for smoke runs and tests), `random:NAME` (a released
architecture with random weights, `models.presets`), a built-in name, a Hugging Face directory,
a `.gguf` file, or a hub id `owner/name` in the local Hugging Face cache (`models.hub`). Random
sources are initialised from `ModelSpec.seed`. `check_source` tells whether a source resolves
without reading any weights, so a run can fail on it before loading data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from prefopt_jax.errors import ModelSourceError
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


def check_source(spec: ModelSpec) -> None:
    """Raise ModelSourceError unless ``spec.source`` names something loadable (no weights read).

    Random sources must name a known preset; a built-in name needs its package; a path must be a
    directory with config.json or a .gguf file; a hub id must be cached unless ``HF_HUB_OFFLINE``
    is unset (it is then downloaded on load, and a failed download raises there).
    """
    if spec.source == "tiny":
        return
    if presets.is_random(spec.source):
        try:
            presets.config(spec.source)
        except ValueError as err:
            raise ModelSourceError(str(err)) from err
        return
    from prefopt_jax.models.hf import resolve_source
    path = resolve_source(spec.source, download=False)
    if path is None or (path.suffix == ".gguf" and path.is_file()):
        return
    if not (Path(path) / "config.json").is_file():
        raise ModelSourceError(f"model {spec.source!r}: {path} is neither a Hugging Face model "
                               "directory (no config.json) nor a .gguf file")


def load_model(spec: ModelSpec):
    """(model, tokenizer): a random model, or weights from disk (a hub id not in the local
    cache is downloaded unless HF_HUB_OFFLINE is set)."""
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

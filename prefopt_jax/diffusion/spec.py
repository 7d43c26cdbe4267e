"""Which diffusion model, and its files: a preset with random weights or a saved directory.

A saved model is a directory with `diffusion_config.json` (the `DiTConfig` fields and the noise
schedule) and `params.npz` (every parameter by its path in the module), written by `save` (a
run's `export/`). `DiffusionModelSpec.source` names a preset ("tiny", "digits") or such a
directory; `load` returns the module and its schedule.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.diffusion.model import PRESETS, DiT, DiTConfig
from prefopt_jax.diffusion.schedules import Schedule
from prefopt_jax.errors import ConfigError, ModelSourceError

CONFIG_FILE = "diffusion_config.json"
PARAMS_FILE = "params.npz"


@dataclasses.dataclass(frozen=True)
class DiffusionModelSpec:
    """The denoiser and its noise schedule (gin: `DiffusionModelSpec`).

    Attributes:
      source: a preset ("tiny", "digits": random weights) or a saved model's directory (its
        config and schedule are read from there; `overrides` and the schedule fields must then
        be left at their defaults).
      overrides: `DiTConfig` fields for a preset, as (name, value) pairs or a dict.
      schedule: noise schedule kind ("linear", "cosine").
      num_timesteps: the schedule's levels T.
      seed: initialises a preset's random weights.
    """

    source: str = "tiny"
    overrides: tuple = ()
    schedule: str = "cosine"
    num_timesteps: int = 1000
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(sorted(dict(self.overrides).items())))

    @property
    def is_preset(self) -> bool:
        return self.source in PRESETS


def config_of(spec: DiffusionModelSpec) -> tuple[DiTConfig, Schedule]:
    """The model config and schedule a spec names (a saved model's are read from its files)."""
    if spec.is_preset:
        fields = {f.name for f in dataclasses.fields(DiTConfig)}
        unknown = sorted(set(dict(spec.overrides)) - fields)
        if unknown:
            raise ConfigError(f"DiffusionModelSpec.overrides: DiTConfig has no field "
                              f"{unknown[0]!r}; its fields: {', '.join(sorted(fields))}")
        try:
            config = dataclasses.replace(PRESETS[spec.source], **dict(spec.overrides))
            schedule = Schedule(kind=spec.schedule, num_steps=spec.num_timesteps)
        except ValueError as err:
            raise ConfigError(f"DiffusionModelSpec: {err}") from None
        return config, schedule
    path = os.path.join(spec.source, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ModelSourceError(f"DiffusionModelSpec.source {spec.source!r}: neither a preset "
                               f"({', '.join(PRESETS)}) nor a saved model directory (no "
                               f"{CONFIG_FILE})")
    if spec.overrides or (spec.schedule, spec.num_timesteps) != ("cosine", 1000):
        raise ConfigError(f"DiffusionModelSpec: a saved model ({spec.source}) brings its own "
                          "config and schedule; leave overrides, schedule and num_timesteps unset")
    try:
        with open(path) as f:
            record = json.load(f)
        return DiTConfig(**record["model"]), Schedule(**record["schedule"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelSourceError(f"{path}: not a diffusion model config ({err})") from None


def new_model(config: DiTConfig, seed: int) -> DiT:
    """A DiT with random weights, initialised under one jit (one compile, not one per layer)."""
    graphdef = nnx.split(nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(seed))))[0]
    state = jax.jit(lambda: nnx.state(DiT(config, rngs=nnx.Rngs(seed))))()
    return nnx.merge(graphdef, state)


def load(spec: DiffusionModelSpec) -> tuple[DiT, Schedule]:
    """(model, schedule): a preset's random weights, or a saved model."""
    config, schedule = config_of(spec)
    model = new_model(config, spec.seed)
    if spec.is_preset:
        return model, schedule
    path = os.path.join(spec.source, PARAMS_FILE)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    try:
        with np.load(path) as saved:
            names = {_key(k): k for k in flat}
            missing = sorted(set(names) - set(saved.files))
            if missing:
                raise ModelSourceError(f"{path}: no parameter {missing[0]!r}")
            for name, key in names.items():
                want = flat[key].get_value()
                value = saved[name]
                if value.shape != want.shape:
                    raise ModelSourceError(f"{path}: parameter {name!r} has shape {value.shape}, "
                                           f"the config needs {want.shape}")
                flat[key].set_value(jnp.asarray(value, want.dtype))
    except OSError as err:
        raise ModelSourceError(f"{path}: cannot read ({err})") from None
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), schedule


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def save(model: DiT, schedule: Schedule, directory: str) -> str:
    """Write `model` and `schedule` to `directory` (files replaced atomically); returns it."""
    os.makedirs(directory, exist_ok=True)
    config = dataclasses.asdict(model.config)
    config["dtype"], config["param_dtype"] = (str(jnp.dtype(config["dtype"])),
                                              str(jnp.dtype(config["param_dtype"])))
    record = {"model": config, "schedule": dataclasses.asdict(schedule)}
    arrays = {_key(k): np.asarray(v.get_value())
              for k, v in nnx.to_flat_state(nnx.state(model))}
    tmp = os.path.join(directory, PARAMS_FILE + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(directory, PARAMS_FILE))
    with open(os.path.join(directory, CONFIG_FILE + ".tmp"), "w") as f:
        json.dump(record, f, indent=1)
    os.replace(os.path.join(directory, CONFIG_FILE + ".tmp"), os.path.join(directory, CONFIG_FILE))
    return directory

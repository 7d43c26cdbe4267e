"""Gin configurables: every name a .gin file may bind, registered in one place (invariant 7).

Gin binds these constructors and `train`; everything is resolved into frozen dataclasses before
any jit. `parse` turns gin's unknown-name errors into messages that list the close names.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import os
import re

import gin

from prefopt_jax import losses
from prefopt_jax.data import LayoutConfig
from prefopt_jax.diffusion import data as diffusion_data
from prefopt_jax.diffusion import spec as diffusion_spec
from prefopt_jax.diffusion import train as diffusion_train
from prefopt_jax.errors import ConfigError
from prefopt_jax.evals import policy_eval
from prefopt_jax.models.lora import LoraConfig
from prefopt_jax.models.spec import ModelSpec
from prefopt_jax.online import iterative, rl
from prefopt_jax.train import build, critic, driver, loop, optim, reward_model
from prefopt_jax.train.reference import ReferenceConfig

CONFIGURABLES = {
    "ModelSpec": ModelSpec,
    "LoraConfig": LoraConfig,
    "DataSpec": loop.DataSpec,
    "LayoutConfig": LayoutConfig,
    "AlgoConfig": build.AlgoConfig,
    "ReferenceConfig": ReferenceConfig,
    "TeacherConfig": build.TeacherConfig,
    "OptimConfig": optim.OptimConfig,
    "LoopConfig": loop.LoopConfig,
    "IterativeConfig": iterative.IterativeConfig,
    "RLConfig": rl.RLConfig,
    "CriticConfig": critic.CriticConfig,
    "DiffusionModelSpec": diffusion_spec.DiffusionModelSpec,
    "ImageDataSpec": diffusion_data.ImageDataSpec,
    "DiffusionConfig": diffusion_train.DiffusionConfig,
}

for _name, _cls in CONFIGURABLES.items():
    gin.external_configurable(_cls, _name)


@gin.configurable
def train(model=gin.REQUIRED, data=gin.REQUIRED, algo=gin.REQUIRED,
          optim=optim.OptimConfig(), loop=loop.LoopConfig(), tiny: bool = False, trainer=None):
    """The gin entry point: `tiny=True` swaps in the random tiny model and synthetic data.

    `trainer` replaces the default (same arguments), e.g. `@train_iterative`. By default the
    objective's declared inputs choose: reward inputs train a reward model
    (`@train_reward_model`), rollout inputs the online RL loop (`@train_online`), the others
    a policy (`loop.train`), diffusion inputs a diffusion model (`@train_diffusion`).
    """
    if tiny:
        lora = getattr(model, "lora", None) and dataclasses.replace(model.lora, rank=2)
        model = dataclasses.replace(model, source="tiny", **(
            {"lora": lora} if hasattr(model, "lora") else {}))
        data = dataclasses.replace(data, source="tiny", batch_size=min(data.batch_size, 4))
    # Held from here, so a second run on the directory is refused before it writes anything.
    with driver.RunDir(loop.output_dir) as run_dir:
        if loop.overwrite or run_dir.finished(loop.steps) is None:
            write_operative(loop.output_dir)  # a finished run's outputs stay as they were
        return (trainer or default_trainer(algo))(model, data, algo, optim, loop)


def default_trainer(algo):
    """The task an objective trains by default, from its declaration."""
    # By the registered name: a rollout objective's group_size comes from the online loop.
    inputs = (losses.info(algo.name).inputs if not algo.mix and algo.name in losses.names()
              else algo.objective().info.inputs)
    if inputs in losses.DIFFUSION_INPUTS:
        return diffusion_train.train
    return {"reward": reward_model.train, "rollout": rl.train}.get(inputs, loop_train)


loop_train = loop.train
CONFIGURABLES["train"] = train
CONFIGURABLES["train_reward_model"] = reward_model.train
CONFIGURABLES["train_iterative"] = iterative.train
CONFIGURABLES["train_online"] = rl.train
CONFIGURABLES["train_diffusion"] = diffusion_train.train
CONFIGURABLES["evaluate"] = policy_eval.evaluate


def write_operative(output_dir: str) -> None:
    """The operative gin config beside the run's outputs (process 0 only).

    Called inside `train`, after gin has built every config object, so it lists them all.
    """
    import jax
    if jax.process_index() == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "operative_config.gin"), "w") as f:
            f.write(gin.operative_config_str())


def parameters(name: str) -> list[str]:
    """Parameter names of a configurable."""
    target = CONFIGURABLES[name]
    if dataclasses.is_dataclass(target):
        return [f.name for f in dataclasses.fields(target)]
    return list(inspect.signature(getattr(target, "__wrapped__", target)).parameters)


def close_names(error: str) -> list[str]:
    """Registered `Configurable.param` names close to the unknown one in a gin error."""
    known = [f"{c}.{p}" for c in CONFIGURABLES for p in parameters(c)] + list(CONFIGURABLES)
    quoted = re.findall(r"'([\w./]+)'", error)
    guesses = []
    for word in quoted:
        guesses += difflib.get_close_matches(word, known, n=5, cutoff=0.5)
    cls_param = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", error)
    if cls_param and cls_param.group(1) in CONFIGURABLES:
        near = difflib.get_close_matches(cls_param.group(2), parameters(cls_param.group(1)),
                                         n=5, cutoff=0.4)
        guesses = [f"{cls_param.group(1)}.{p}" for p in near] + guesses
    return list(dict.fromkeys(guesses))




REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gin_path_misses(record: logging.LogRecord) -> bool:
    """False for gin's "Path not found" log, written at error level for each search location
    an include is not in (the working directory before the repository root) even when the
    next location has it; a file found nowhere still fails the parse with its name."""
    return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                and record.getMessage().startswith("Path not found"))


def parse(files: list[str], bindings: list[str]) -> None:
    """Parse gin files then `NAME=VALUE` bindings; unknown names fail here, before compute."""
    gin.clear_config()
    # `include 'configs/...'` resolves from the repository root whatever the working directory.
    if REPO_ROOT not in gin.config._LOCATION_PREFIXES:  # gin has no public reader of the list
        gin.add_config_file_search_path(REPO_ROOT)
    root_logger = logging.getLogger()
    root_logger.addFilter(_gin_path_misses)
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    except (ValueError, KeyError, SyntaxError) as err:
        hints = close_names(str(err))
        hint = f"\nclose names: {', '.join(hints)}" if hints else ""
        raise ConfigError(f"{err}{hint}") from err
    finally:
        root_logger.removeFilter(_gin_path_misses)

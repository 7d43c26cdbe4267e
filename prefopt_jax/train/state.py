"""The training state pytree and its shardings.

`TrainState` holds arrays only (nnx states, optax state, scalars); the model's graph definition
and every static choice live in `StepSetup`, outside the state, so `train_step` is a pure
function of `(state, batch)` and the state can be donated and checkpointed as one pytree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import sharding as sharding_lib

# The model's rules plus the axes that only the trainer introduces.
TRAIN_RULES = tuple(sharding_lib.LOGICAL_AXIS_RULES) + (("lora_rank", None),)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes.

    Fields:
      step: int32 scalar, optimiser steps taken.
      params: trainable parameters: the model's Params, or the LoRA adapters.
      base: the frozen base Params under LoRA (the reference), else None.
      rest: non-Param model state (buffers), carried unchanged.
      ref: reference Params for the frozen / previous-iterate / soft-update kinds, else None.
      opt_state: optax state (float32 when `fp32_state`).
      loss_state: state of stateful objectives (bco running mean), else None.
      rng: PRNG key for stochastic objectives; split every step.
      frozen: Params of frozen models an objective reads (`{"teacher": ..., "teacher_ref":
        ...}`: a DPO teacher and its reference), else None.
      aux: arrays a task keeps across steps and checkpoints (APO's previous iterate), else None.
      critic: the critic of objectives that need one (`train.critic`: `{"params": {"head",
        "trunk"}, "rest", "opt"}`), trained in the same step with its own optimiser; else None.
    """

    step: jax.Array
    params: Any
    base: Any
    rest: Any
    ref: Any
    opt_state: Any
    loss_state: Any
    rng: jax.Array
    frozen: Any = None
    aux: Any = None
    critic: Any = None


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """Static parts of a step, resolved from configs before jit (never read inside a trace).

    Attributes:
      graphdef: the model's nnx graph definition.
      tx: the optax transformation.
      objective: the composed objective (`losses.Objective`: function, hyper-parameters and
        declaration); `objective(inputs, state)` computes it.
      reference: the reference strategy (see `train.reference`).
      lora: LoRA config when training adapters, else None.
      logps_chunk: positions projected to the vocabulary at a time.
      fp32_state: optimiser state and updates in float32 whatever the params' dtype.
      teacher_beta: the DPO teacher's beta (token rewards `b (log pi_dpo - log pi_ref)`).
      teacher_graphdef: the teacher's graph definition (it may differ from the policy's).
      critic: the critic's static setup (`train.critic.CriticSetup`) when the objective needs
        one, else None.
    """

    graphdef: Any
    tx: Any
    objective: Any
    reference: Any
    lora: lora_lib.LoraConfig | None = None
    logps_chunk: int = 512
    fp32_state: bool = True
    teacher_beta: float = 0.1
    teacher_graphdef: Any = None
    critic: Any = None

    @property
    def loss_kind(self) -> str:
        """The inputs type the objective reads (`losses.INPUTS`)."""
        return self.objective.info.inputs

    @property
    def needs(self) -> tuple[str, ...]:
        """What the step supplies beyond policy and reference log-probs (`losses.NEEDS`)."""
        return self.objective.info.needs

    @property
    def mismatched(self) -> bool:
        """Score mismatched completions for the loss (KTO's z0)."""
        return "mismatched" in self.needs


def to_f32(tree):
    """Floating leaves cast to float32 (the optimiser's view of bf16 params)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def policy_params(setup: StepSetup, state: TrainState, factored: bool = False):
    """The policy's full model Params: merged adapters under LoRA, else the trained params.

    `factored`: adapted kernels stay unmerged `LoraKernel`s (see `lora.apply_lora`), for the
    model forwards of the training step; merged arrays everywhere else (references, export).
    """
    if setup.lora is None:
        return state.params
    return lora_lib.apply_lora(state.base, state.params, setup.lora.scale, factored=factored)


def leaf_spec(leaf, mesh_shape: dict, rules) -> PartitionSpec:
    """PartitionSpec of one Variable from its logical names; replicated when they do not fit.

    Factored optimiser statistics (adafactor) inherit the parameter's names but not its rank,
    so a rank mismatch means replicated rather than an error.
    """
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    shape = getattr(value, "shape", ())
    if not names or len(names) != len(shape):
        return PartitionSpec()
    return sharding_lib.logical_to_spec(names, shape, mesh_shape, rules)


def tree_shardings(tree, mesh: Mesh, rules=TRAIN_RULES):
    """NamedSharding for every array leaf of a pytree of (abstract) Variables and arrays."""
    mesh_shape = dict(mesh.shape)

    def one(leaf):
        sharding = NamedSharding(mesh, leaf_spec(leaf, mesh_shape, rules))
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))

"""Assemble a step from frozen configs: StepSetup, the initial sharded state, the jitted step.

Everything here runs outside jit: it reads configs, splits the model and places arrays; the
returned step function is compiled once for the batch shape it first sees.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from prefopt_jax import losses
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.train import optim, reference, step as step_lib
from prefopt_jax.train.state import StepSetup, tree_shardings


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """The objective: a registry name and its hyperparameters (sorted name/value pairs)."""

    loss: str = "dpo"
    hyper: tuple = ()
    reference: reference.ReferenceConfig = reference.ReferenceConfig()

    def __post_init__(self):
        # Gin hands over a dict; keep a hashable, ordered form.
        object.__setattr__(self, "hyper", tuple(sorted(dict(self.hyper).items())))


def make_setup(graphdef, algo: AlgoConfig, optim_config: optim.OptimConfig,
               lora: lora_lib.LoraConfig | None = None, logps_chunk: int = 512) -> StepSetup:
    """The static half of a step; unknown loss names fail here, before any compute."""
    fn, info = losses.get(algo.loss), losses.info(algo.loss)
    if info.kind not in step_lib.TRAINABLE_KINDS:
        raise ValueError(f"objective {algo.loss!r} reads {info.kind} inputs, which preference "
                         f"batches do not provide; trainable kinds: {step_lib.TRAINABLE_KINDS}")
    if algo.reference.kind == "lora" and lora is None:
        raise ValueError("reference kind 'lora' needs LoRA training (a LoraConfig)")
    if info.needs_reference and algo.reference.kind == "none":
        raise ValueError(f"objective {algo.loss!r} needs a reference; ReferenceConfig.kind is "
                         "'none' (use frozen, lora, precomputed or previous)")
    ref = reference.Reference(algo.reference)
    mismatched = info.needs_mismatched(algo.hyper)
    if mismatched and not ref.scores_new_sequences:
        raise ValueError(
            f"objective {algo.loss!r} scores mismatched completions (prompt i, completion i+1) "
            f"under the reference; the {ref.kind!r} reference cache holds only the data's own "
            f"pairs. Use reference kind frozen or lora, or set {info.mismatched_unless!r} "
            "explicitly in AlgoConfig.hyper")
    return StepSetup(graphdef=graphdef, tx=optim.build_optimizer(optim_config), loss_fn=fn,
                     loss_kind=info.kind, hyper=tuple(sorted(dict(algo.hyper).items())),
                     reference=ref, lora=lora, logps_chunk=logps_chunk,
                     fp32_state=optim_config.fp32_state, mismatched=mismatched)


# Sorting over the batch: a sort within each micro-batch is a different objective, not an
# approximation, so accumulation is refused rather than silently changing the loss.
SORT_COUPLED = frozenset({"aot", "aot_unpaired"})


def check_accumulation(loss: str, micro_batches: int, hyper=()) -> None:
    """Refuse (sorts) or warn (batch statistics) when a batch-coupled objective is accumulated.

    Under gradient accumulation each micro-batch is one call of the loss, so a statistic over
    "the batch" (KTO's z0 from mismatched rows, BCO's reward mean) is the micro-batch's; BCO's
    running mean still sees every example, in micro-batch order. `hyper`: the objective's
    hyperparameters; KTO with an explicit z0 couples nothing and is not warned about.
    """
    info = losses.info(loss)
    if micro_batches <= 1 or not info.batch_coupled:
        return
    if info.mismatched_unless is not None and not info.needs_mismatched(hyper):
        return
    if loss in SORT_COUPLED:
        raise ValueError(f"objective {loss!r} sorts over the global batch; with micro_batches="
                         f"{micro_batches} each micro-batch would be sorted alone. Use "
                         "micro_batches=1 (raise batch_size per device instead)")
    hint = ""
    if info.mismatched_unless is not None:
        hint = (f" (mismatched completions pair examples of one micro-batch; set "
                f"{info.mismatched_unless!r} explicitly to decouple)")
    warnings.warn(f"objective {loss!r} couples examples through a batch statistic; with "
                  f"micro_batches={micro_batches} the statistic is per micro-batch{hint}",
                  stacklevel=2)


def initial_loss_state(setup: StepSetup, batch_m) -> Any:
    """The loss state a stateful objective starts from (structure from one abstract call)."""
    def probe(batch):
        q, c = batch["completion_mask"].shape
        zeros = jnp.zeros((q, c), jnp.float32)
        ref = None if setup.reference.kind == "none" else zeros
        mismatched = (zeros, zeros, zeros) if setup.mismatched else None
        inputs = step_lib.loss_inputs(setup.loss_kind, zeros, ref, batch, mismatched)
        return setup.loss_fn(inputs, None, **dict(setup.hyper)).state

    try:
        shapes = jax.eval_shape(probe, jax.tree.map(lambda x: x[0], batch_m))
    except (KeyError, AttributeError, TypeError) as err:
        # Before any compile: the objective reads an input this data does not carry.
        raise ValueError(f"objective {setup.loss_fn.__name__!r} cannot train on this data "
                         f"(keys {sorted(batch_m)}): {err}") from err
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def split_model(model: nnx.Module, setup_lora: lora_lib.LoraConfig | None, seed: int):
    """(graphdef, trainable, base, rest): adapters train under LoRA, else the model's Params."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if setup_lora is None:
        return graphdef, params, None, rest
    adapters = lora_lib.init_adapters(params, setup_lora, jax.random.key(seed + 1))
    return graphdef, adapters, params, rest


def place_state(setup: StepSetup, params, base, rest, batch_m, mesh: Mesh, seed: int,
                donate: bool = False):
    """The initial TrainState, built under jit with out_shardings from the logical axes.

    `donate=True` hands the model's arrays over to the state: where the mesh keeps them where
    they are (one device), the state's params (or LoRA base) reuse their buffers instead of
    copying them, so the weights are never held twice, and the arrays passed in (and the model
    they came from) are deleted. Where the mesh reshards them, the resharded copies are donated
    and the loaded arrays are freed when the caller drops the model. Use it when the model is
    not needed again, as `prefopt train` does.
    """
    loss_state = initial_loss_state(setup, batch_m)
    init = lambda p, b, r: step_lib.init_state(setup, p, b, r, loss_state, seed)  # noqa: E731
    abstract = jax.eval_shape(init, params, base, rest)
    shardings = tree_shardings(abstract, mesh)
    arg_sh = tree_shardings((params, base, rest), mesh)
    with jax.set_mesh(mesh):
        args = jax.device_put((params, base, rest), arg_sh)
        donated = (0, 1, 2) if donate else ()
        state = jax.jit(init, out_shardings=shardings, donate_argnums=donated)(*args)
    return state, abstract


def build(model: nnx.Module, algo: AlgoConfig, optim_config: optim.OptimConfig, batch_m,
          mesh: Mesh, lora: lora_lib.LoraConfig | None = None, logps_chunk: int = 512,
          seed: int = 0, donate: bool = False):
    """(setup, state, step_fn, batch_shardings) ready to train on batches shaped like `batch_m`.

    `donate=True`: the state takes over the model's arrays (`place_state`); `model` is unusable
    afterwards.
    """
    graphdef, params, base, rest = split_model(model, lora, seed)
    setup = make_setup(graphdef, algo, optim_config, lora, logps_chunk)
    state, abstract = place_state(setup, params, base, rest, batch_m, mesh, seed, donate)
    step_fn, _, batch_sh = step_lib.compile_train_step(setup, abstract, batch_m, mesh)
    return setup, state, step_fn, batch_sh


def stack_micro(batches: list[dict]) -> dict:
    """Stack micro-batches on a new leading axis (the step's `m`)."""
    return {k: jnp.stack([jnp.asarray(b[k]) for b in batches]) for k in batches[0]}

"""The pure training step: `train_step(state, batch) -> (state, metrics)`.

Shape letters: `m` micro-batches, `r` rows, `t` row positions, `q` sequences, `c` completion
positions, `p` pairs (or unpaired examples), `k` list items.

Every batch array has a leading micro-batch axis `m` (1 without accumulation). Gradients of
`sum_p loss_p / N` are summed over micro-batches, with `N` the number of real examples in the
whole batch, so the result equals one big batch exactly; metrics are summed as (sum, count)
pairs. `compile_train_step` jits the step once with in/out shardings derived from the state's
logical axes over the mesh, and donates the state.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import losses
from prefopt_jax.losses.base import PairwiseInputs, UnpairedInputs, ListwiseInputs
from prefopt_jax.train import logps as logps_lib
from prefopt_jax.train.state import StepSetup, TrainState, policy_params, to_f32, tree_shardings

Metrics = dict[str, tuple[jax.Array, jax.Array]]
BATCH_AXES = ("data", "fsdp")


def loss_kind(fn) -> str:
    """"pairwise", "unpaired" or "listwise", from the annotation of the loss's `inputs`."""
    call = fn if inspect.isfunction(fn) else getattr(fn, "__call__", fn)
    try:
        annotation = inspect.signature(call).parameters["inputs"].annotation
    except (KeyError, ValueError, TypeError):
        return "pairwise"
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    for kind, cls in (("unpaired", UnpairedInputs), ("listwise", ListwiseInputs)):
        if cls.__name__ in name:
            return kind
    return "pairwise"


def _opt(batch, key):
    value = batch.get(key)
    return None if value is None else value.astype(jnp.float32)


def pairwise_inputs(logps_qc, ref_qc, batch) -> PairwiseInputs:
    """Chosen sequences are even rows `2p`, rejected odd rows `2p + 1` (the batch contract)."""
    mask_qc = batch["completion_mask"]
    ref = (None, None) if ref_qc is None else (ref_qc[0::2], ref_qc[1::2])
    return PairwiseInputs(
        logps_w_pc=logps_qc[0::2], logps_l_pc=logps_qc[1::2],
        mask_w_pc=mask_qc[0::2], mask_l_pc=mask_qc[1::2],
        ref_logps_w_pc=ref[0], ref_logps_l_pc=ref[1],
        valid_p=batch["pair_valid"], weight_p=_opt(batch, "weight"),
        margin_p=_opt(batch, "margin"), score_w_p=_opt(batch, "score_chosen"),
        score_l_p=_opt(batch, "score_rejected"))


def unpaired_inputs(logps_qc, ref_qc, batch) -> UnpairedInputs:
    """One sequence per example with its desirable/undesirable label."""
    return UnpairedInputs(
        logps_nc=logps_qc, mask_nc=batch["completion_mask"], label_n=batch["label"] > 0,
        ref_logps_nc=ref_qc, valid_n=batch["pair_valid"], weight_n=_opt(batch, "weight"))


def listwise_inputs(logps_qc, ref_qc, batch) -> ListwiseInputs:
    """`K = Q / P` items per prompt, in order."""
    p = batch["pair_valid"].shape[0]
    to_pkc = lambda x: None if x is None else x.reshape((p, -1) + x.shape[1:])  # noqa: E731
    return ListwiseInputs(
        logps_pkc=to_pkc(logps_qc), mask_pkc=to_pkc(batch["completion_mask"]),
        scores_pk=batch["scores"].astype(jnp.float32), ref_logps_pkc=to_pkc(ref_qc),
        valid_p=batch["pair_valid"], weight_p=_opt(batch, "weight"))


INPUT_BUILDERS = {"pairwise": pairwise_inputs, "unpaired": unpaired_inputs,
                  "listwise": listwise_inputs}


def forward_logps(setup: StepSetup, params, rest, batch) -> jax.Array:
    """Chunked per-token log-probs `[Q, C]` of the batch under full model Params."""
    model = nnx.merge(setup.graphdef, params, rest)
    return logps_lib.token_logps(model, batch, setup.logps_chunk)


def micro_loss(train_params, state: TrainState, batch, loss_state, total: jax.Array, setup):
    """Loss of one micro-batch scaled by the whole batch's example count, and its outputs."""
    policy = policy_params(setup, state.replace(params=train_params))
    logps_qc = forward_logps(setup, policy, state.rest, batch)
    ref_qc = setup.reference.logps(
        lambda p: forward_logps(setup, p, state.rest, batch), state, batch)
    inputs = INPUT_BUILDERS[setup.loss_kind](logps_qc, ref_qc, batch)
    # Loss-specific per-example data (win rates, gold completions...) rides as `extra/<name>`.
    extras = {k[len("extra/"):]: v for k, v in batch.items() if k.startswith("extra/")}
    inputs = inputs.replace(extras=extras) if extras else inputs
    out = setup.loss_fn(inputs, loss_state, **dict(setup.hyper))
    scaled = jnp.sum(out.loss_p) / jnp.maximum(total, 1.0)
    tokens = jnp.sum(batch["completion_mask"].astype(jnp.float32))
    metrics = dict(out.metrics, tokens=(tokens, jnp.float32(1.0)))
    return scaled, (metrics, out.state)


def accumulate(setup: StepSetup, state: TrainState, batch_m):
    """Summed gradients, summed (sum, count) metrics and the final loss state over micro-batches."""
    total = jnp.sum(batch_m["pair_valid"].astype(jnp.float32))
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def scan_body(carry, batch):
        grads, metrics, loss_state = carry
        (_, (m_metrics, loss_state)), g = grad_fn(state.params, state, batch, loss_state, total,
                                                  setup)
        grads = jax.tree.map(jnp.add, grads, g)
        metrics = jax.tree.map(jnp.add, metrics, m_metrics)
        return (grads, metrics, loss_state), None

    first = jax.tree.map(lambda x: x[0], batch_m)
    (_, (metrics0, loss_state)), grads0 = grad_fn(state.params, state, first, state.loss_state,
                                                  total, setup)
    rest_m = jax.tree.map(lambda x: x[1:], batch_m)
    (grads, metrics, loss_state), _ = jax.lax.scan(scan_body, (grads0, metrics0, loss_state),
                                                   rest_m)
    return grads, metrics, loss_state


def apply_gradients(setup: StepSetup, state: TrainState, grads):
    """Optimiser update; in float32 when `fp32_state`, then cast back to the params' dtypes."""
    params = to_f32(state.params) if setup.fp32_state else state.params
    grads = to_f32(grads) if setup.fp32_state else grads
    updates, opt_state = setup.tx.update(grads, state.opt_state, params)
    new = optax.apply_updates(params, updates)
    new = jax.tree.map(lambda n, old: n.astype(old.dtype), new, state.params)
    return new, opt_state


def train_step(setup: StepSetup, state: TrainState, batch_m) -> tuple[TrainState, Metrics]:
    """One optimiser step on a batch with a leading micro-batch axis (pure)."""
    grads, metrics, loss_state = accumulate(setup, state, batch_m)
    params, opt_state = apply_gradients(setup, state, grads)
    grad_norm = optax.tree.norm(grads)
    rng, _ = jax.random.split(state.rng)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          loss_state=loss_state, rng=rng)
    state = setup.reference.after_step(state, policy_params(setup, state))
    metrics = dict(metrics, grad_norm=(grad_norm, jnp.float32(1.0)))
    return state, metrics


def init_state(setup: StepSetup, params, base, rest, loss_state, seed: int) -> TrainState:
    """The initial TrainState from model Params (pure: run under jit with out_shardings)."""
    full = params if setup.lora is None else base
    opt_params = to_f32(params) if setup.fp32_state else params
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, base=base, rest=rest,
        ref=setup.reference.init(full), opt_state=setup.tx.init(opt_params),
        loss_state=loss_state, rng=jax.random.key_data(jax.random.key(seed)))


def batch_shardings(batch_m: Mapping[str, Any], mesh: Mesh):
    """Batch arrays `[M, X, ...]` sharded over (data, fsdp) on X, the leading example axis.

    An axis the data-parallel size does not divide stays replicated (correct, just slower).
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def one(x):
        lead = BATCH_AXES if x.shape[1] % shards == 0 else None
        return NamedSharding(mesh, PartitionSpec(None, lead, *([None] * (len(x.shape) - 2))))

    return {k: one(v) for k, v in batch_m.items()}


def compile_train_step(setup: StepSetup, abstract_state: TrainState, batch_example, mesh: Mesh):
    """`train_step` jitted once with in/out shardings from logical axes; the state is donated.

    Returns (step_fn, state_shardings, batch_shardings).
    """
    state_sh = tree_shardings(abstract_state, mesh)
    batch_sh = batch_shardings(batch_example, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(lambda s, b: train_step(setup, s, b), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=0)
    return step, state_sh, batch_sh

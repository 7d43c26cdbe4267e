"""The pure training step: `train_step(state, batch) -> (state, metrics)`.

Shape letters: `m` micro-batches, `r` rows, `t` row positions, `q` sequences, `c` completion
positions, `p` pairs (or unpaired examples), `k` list items.

Every batch array has a leading micro-batch axis `m` (1 without accumulation). Gradients of
`sum_p loss_p / N` are summed over micro-batches, with `N` the number of real examples in the
whole batch, so the result equals one big batch exactly; metrics are summed as (sum, count)
pairs. `compile_train_step` jits the step once with in/out shardings derived from the state's
logical axes over the mesh, and donates the state.

Batch-coupled objectives under accumulation: each micro-batch is one call of the loss, so a
statistic over "the batch" is the micro-batch's. `build.check_accumulation` refuses the sorting
objectives (aot, aot_unpaired) with micro_batches > 1 and warns for batch statistics (kto with
mismatched rows, bco/bco_pair, whose running mean still sees every example in order, mpo).

KTO's mismatched completions (`StepSetup.mismatched`): each micro-batch also scores example q's
prompt with the next example's completion, under the policy and the reference, no gradient
(`mismatched_logps`); the loss turns them into z0.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prefopt_jax import losses
from prefopt_jax.losses.base import UnpairedInputs
from prefopt_jax.train import logps as logps_lib
from prefopt_jax.train.state import StepSetup, TrainState, policy_params, to_f32, tree_shardings

Metrics = dict[str, tuple[jax.Array, jax.Array]]
BATCH_AXES = ("data", "fsdp")


def _opt(batch, key):
    value = batch.get(key)
    return None if value is None else value.astype(jnp.float32)


def loss_inputs(kind: str, logps_qc, ref_qc, batch, mismatched=None):
    """The loss's inputs from `[Q, C]` log-probs and the batch (the losses' layout adapters).

    Paired batches interleave chosen `2p` and rejected `2p + 1`; listwise batches hold `K = Q / P`
    items per prompt in order; unpaired batches one labelled sequence per example.
    `mismatched`: (policy log-probs, reference log-probs, mask) `[Q, C]` of the mismatched
    completions (`mismatched_logps`), for unpaired objectives that read them.
    """
    mask_qc, valid_p = batch["completion_mask"], batch["pair_valid"]
    if kind == "pairwise":
        return losses.pairwise_from_interleaved(
            logps_qc, mask_qc, ref_qc, valid_p=valid_p, weight_p=_opt(batch, "weight"),
            margin_p=_opt(batch, "margin"), score_w_p=_opt(batch, "score_chosen"),
            score_l_p=_opt(batch, "score_rejected"))
    if kind == "listwise":
        return losses.listwise_from_flat(logps_qc, mask_qc, batch["scores"].astype(jnp.float32),
                                         ref_qc, valid_p=valid_p, weight_p=_opt(batch, "weight"))
    if kind == "unpaired":
        kl = dict(zip(("kl_logps_nc", "kl_ref_logps_nc", "kl_mask_nc"), mismatched or ()))
        return UnpairedInputs(logps_nc=logps_qc, mask_nc=mask_qc, label_n=batch["label"] > 0,
                              ref_logps_nc=ref_qc, valid_n=valid_p,
                              weight_n=_opt(batch, "weight"), **kl)
    raise ValueError(f"objectives of kind {kind!r} do not train on preference batches; "
                     f"supported kinds: {TRAINABLE_KINDS}")


TRAINABLE_KINDS = ("pairwise", "unpaired", "listwise")


def forward_logps(setup: StepSetup, params, rest, batch) -> jax.Array:
    """Chunked per-token log-probs `[Q, C]` of the batch under full model Params."""
    model = nnx.merge(setup.graphdef, params, rest)
    return logps_lib.token_logps(model, batch, setup.logps_chunk)


def mismatched_logps(setup: StepSetup, policy, state: TrainState, batch):
    """(policy, reference) log-probs and mask `[Q, C]` of the mismatched completions (KTO's z0).

    Sequence q is example q's prompt with the next real example's completion (within this
    micro-batch, which spans every host), built on device from the batch; no gradient. A
    sequence the mismatched rows cannot hold (never for unpaired data) gets nan log-probs, so
    the loss turns non-finite and the loop stops, rather than z0 quietly skipping it.
    """
    kl_batch, fits_q = logps_lib.mismatched_batch(batch)
    forward = lambda p: forward_logps(setup, p, state.rest, kl_batch)  # noqa: E731
    pol_qc = jax.lax.stop_gradient(forward(jax.lax.stop_gradient(policy)))
    ref_qc = setup.reference.logps(forward, state, kl_batch)
    poison = lambda x: jnp.where(fits_q[:, None], x, jnp.nan)  # noqa: E731
    return poison(pol_qc), poison(ref_qc), kl_batch["completion_mask"]


def micro_loss(train_params, state: TrainState, batch, loss_state, total: jax.Array, setup):
    """Loss of one micro-batch scaled by the whole batch's example count, and its outputs."""
    # Unmerged adapters: the backward pass then needs no full [in, out] weight gradient.
    policy = policy_params(setup, state.replace(params=train_params), factored=True)
    logps_qc = forward_logps(setup, policy, state.rest, batch)
    ref_qc = setup.reference.logps(
        lambda p: forward_logps(setup, p, state.rest, batch), state, batch)
    mismatched = mismatched_logps(setup, policy, state, batch) if setup.mismatched else None
    inputs = loss_inputs(setup.loss_kind, logps_qc, ref_qc, batch, mismatched)
    # Loss-specific per-example data (win rates, gold completions...) rides as `extra/<name>`.
    extras = {k[len("extra/"):]: v for k, v in batch.items() if k.startswith("extra/")}
    inputs = inputs.replace(extras=extras) if extras else inputs
    out = setup.loss_fn(inputs, loss_state, **dict(setup.hyper))
    scaled = jnp.sum(out.loss_p) / jnp.maximum(total, 1.0)
    tokens = jnp.sum(batch["completion_mask"].astype(jnp.float32))
    metrics = dict(out.metrics, tokens=(tokens, jnp.float32(1.0)))
    return scaled, (metrics, out.state)


def accumulate(setup: StepSetup, state: TrainState, batch_m):
    """Summed gradients, summed (sum, count) metrics and the final loss state over micro-batches.

    One scan over all `m` micro-batches from zero sums, so the model is traced and compiled once
    (a length-1 scan is inlined by XLA; peeling the first micro-batch would compile it twice).
    """
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
    shapes = jax.eval_shape(lambda *a: grad_fn(*a, setup), state.params, state, first,
                            state.loss_state, total)
    (_, (metrics_shape, _)), grads_shape = shapes
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    carry = (zeros(grads_shape), zeros(metrics_shape), state.loss_state)
    (grads, metrics, loss_state), _ = jax.lax.scan(scan_body, carry, batch_m)
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

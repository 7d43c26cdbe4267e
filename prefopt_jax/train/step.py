"""The pure training step: `train_step(state, batch) -> (state, metrics)`.

Shape letters: `m` micro-batches, `r` rows, `t` row positions, `q` sequences, `c` completion
positions, `p` pairs (or unpaired examples), `k` list items.

Every batch array has a leading micro-batch axis `m` (1 without accumulation). Gradients of
`sum_p loss_p / N` are summed over micro-batches, with `N` the number of real examples in the
whole batch, so the result equals one big batch exactly; metrics are summed as (sum, count)
pairs. `compile_train_step` jits the step once with in/out shardings derived from the state's
logical axes over the mesh, and donates the state.

What the objective reads comes from its declaration (`losses.info`, `StepSetup.needs`):
`score` runs the models (policy, reference, a frozen teacher) and computes per-token terms in the
log-prob chunks; `objective_inputs` shapes them and the batch's fields into the inputs type the
objective declares. KTO's mismatched completions (the `mismatched` need): each micro-batch also
scores example q's prompt with the next example's completion, under the policy and the
reference, no gradient (`mismatched_logps`); the loss turns them into z0.

Batch-coupled objectives under accumulation: each micro-batch is one call of the loss, so a
statistic over "the batch" is the micro-batch's. `build.check_accumulation` refuses the sorting
objectives (aot, aot_unpaired) with micro_batches > 1 and warns for batch statistics (kto with
mismatched rows, bco/bco_pair, whose running mean still sees every example in order, mpo).
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
from prefopt_jax.losses.base import UnpairedInputs
from prefopt_jax.scoring import logps as logps_lib
from prefopt_jax.train import critic as critic_lib, optim
from prefopt_jax.train.state import StepSetup, TrainState, policy_params, to_f32, tree_shardings

Metrics = dict[str, tuple[jax.Array, jax.Array]]
BATCH_AXES = ("data", "fsdp")


def _opt(batch, key):
    value = batch.get(key)
    return None if value is None else value.astype(jnp.float32)


def frozen_model(setup: StepSetup, state: TrainState, name: str):
    """The frozen model `name` of the state ("teacher", "teacher_ref"), no gradient; or None."""
    entry = (state.frozen or {}).get(name)
    if entry is None:
        return None
    params, rest = jax.lax.stop_gradient((entry["params"], entry["rest"]))
    return nnx.merge(setup.teacher_graphdef, params, rest)


def teacher_reference(setup: StepSetup, state: TrainState):
    """The DPO teacher's reference model: its own, or the run's reference (frozen, lora)."""
    model = frozen_model(setup, state, "teacher_ref")
    if model is not None:
        return model
    params = setup.reference.params(state)
    return nnx.merge(setup.graphdef, jax.lax.stop_gradient(params), state.rest)


def score(setup: StepSetup, policy, state: TrainState, batch, critic_params=None) -> dict:
    """Everything the objective reads from models, per token `[Q, C]` (float32).

    Always `logps` (the policy, with gradient) and `ref` (the reference, or None when there is
    none or the objective distils); by the objective's needs also `log_sum_p2` (WPO), `kl` and
    `teacher_weight` (a teacher's vocabulary terms, `LossInfo.token_terms`), `token_rewards`
    (`b (log pi_dpo - log pi_ref)`, and the unscaled log-ratio `dpo_log_ratio` for RTO),
    `mismatched` (KTO) and `values` (the critic's `V(s_t)`, with gradient into
    `critic_params`). Vocabulary-wide terms are computed in the log-prob chunks.
    """
    needs = setup.needs
    model = nnx.merge(setup.graphdef, policy, state.rest)
    hiddens = [logps_lib.model_hidden(model, batch)]
    projects = [logps_lib.float32_projection(model)]
    stats = "token_stats" in needs
    entropy = setup.loss_kind == "rollout"  # reported, and the entropy bonus's gradient
    # Differentiated only for a bonus; a mix answers None and keeps the gradient.
    entropy_gradient = setup.objective.setting("entropy_coef", 0.0) != 0.0
    if "teacher_logits" in needs:
        terms = setup.objective.info.token_terms
        hyper = {k: v for k, v in setup.objective.hyper
                 if k in inspect.signature(terms).parameters}
        for other in (frozen_model(setup, state, "teacher"), teacher_reference(setup, state)):
            hiddens.append(jax.lax.stop_gradient(logps_lib.model_hidden(other, batch)))
            projects.append(logps_lib.float32_projection(other))

        def fn(logits_mv, teacher_mv, ref_mv, targets_m):
            return {**logps_lib.target_terms(logits_mv, targets_m, stats),
                    **terms(logits_mv, teacher_mv, ref_mv, **hyper)}
    else:
        fn = lambda logits_mv, targets_m: logps_lib.target_terms(  # noqa: E731
            logits_mv, targets_m, stats, entropy, entropy_gradient)
    scores = logps_lib.gathered_terms(fn, projects, hiddens, batch["source_index"],
                                      batch["target_tokens"], setup.logps_chunk,
                                      batch["completion_mask"])
    # Distillation reads the teacher's terms, not reference log-probs.
    scores["ref"] = None if setup.loss_kind == "distill" else setup.reference.logps(
        lambda p: forward_logps(setup, p, state.rest, batch), state, batch)
    if "token_rewards" in needs:
        teacher_qc = logps_lib.token_logps(frozen_model(setup, state, "teacher"), batch,
                                           setup.logps_chunk)
        teacher_ref = frozen_model(setup, state, "teacher_ref")
        ref_qc = scores["ref"] if teacher_ref is None else logps_lib.token_logps(
            teacher_ref, batch, setup.logps_chunk)
        log_ratio_qc = jax.lax.stop_gradient(teacher_qc - ref_qc)
        scores["token_rewards"] = setup.teacher_beta * log_ratio_qc
        scores["dpo_log_ratio"] = log_ratio_qc
    if setup.mismatched:
        scores["mismatched"] = mismatched_logps(setup, policy, state, batch)
    if setup.critic is not None:
        scores["values"] = critic_lib.critic_values(setup.critic, critic_params,
                                                    state.critic["rest"], batch, hiddens[0])
    return scores


def _fold(x_qc, p: int):
    """`[Q, ...]` sequences as `[P, K, ...]`, K = Q / P completions per example (a reshape, so a
    batch sharded over examples stays sharded the same way)."""
    return None if x_qc is None else x_qc.reshape(p, x_qc.shape[0] // p, *x_qc.shape[1:])


def _filled(batch, key: str, fill: float):
    """A per-example batch field with filler examples set to `fill` (their data is nan)."""
    return jnp.where(batch["pair_valid"] > 0, batch[key].astype(jnp.float32), fill)


def pairwise_inputs(setup: StepSetup, scores: dict, batch) -> losses.PairwiseInputs:
    """Chosen (completion 0) and rejected (1) of each example, and what the needs add."""
    needs, p = setup.needs, batch["pair_valid"].shape[0]
    logps, ref, mask = (_fold(x, p) for x in (scores["logps"], scores["ref"],
                                              batch["completion_mask"]))
    side = lambda x, j: None if x is None else x[:, j]  # noqa: E731
    extras = {}
    if "gold" in needs:  # triples: completion 2 is the gold one
        extras.update(gold_logps_pc=logps[:, 2], gold_mask_pc=mask[:, 2])
    if "win_probs" in needs:
        extras.update(win_prob_w_p=_filled(batch, "win_prob_chosen", 0.5),
                      win_prob_l_p=_filled(batch, "win_prob_rejected", 0.5))
    if "margins" in needs:  # [P, K, M]: each completion's reward under M other reward models
        margins = batch["margins"].astype(jnp.float32)
        extras.update(other_rewards_w_pk=margins[:, 0], other_rewards_l_pk=margins[:, 1])
    if "token_stats" in needs:
        stats = _fold(scores["log_sum_p2"], p)
        extras.update(log_sum_p2_w_pc=stats[:, 0], log_sum_p2_l_pc=stats[:, 1])
    rewards = _fold(scores.get("token_rewards"), p)
    return losses.PairwiseInputs(
        logps_w_pc=logps[:, 0], logps_l_pc=logps[:, 1], mask_w_pc=mask[:, 0],
        mask_l_pc=mask[:, 1], ref_logps_w_pc=side(ref, 0), ref_logps_l_pc=side(ref, 1),
        valid_p=batch["pair_valid"], weight_p=_opt(batch, "weight"),
        margin_p=_opt(batch, "margin"), score_w_p=_opt(batch, "score_chosen"),
        score_l_p=_opt(batch, "score_rejected"), token_rewards_w_pc=side(rewards, 0),
        token_rewards_l_pc=side(rewards, 1), extras=extras)


def rollout_inputs(scores: dict, batch) -> losses.RolloutInputs:
    """Each example is a group: one prompt and its K sampled completions (rows `p K + j`).

    The batch carries the rewards `[P, K]`, which samples count (`sample_valid`: a sample with
    no reward, or an overlong one filtered out, is 0), the behaviour log-probs `old_logps`
    `[Q, C]` of the sampler, with the `group_preferences` need `win_probs` `[P, K, K]`, with
    a critic the values at sampling time `old_values` `[Q, C]` (none: the current values,
    frozen), and with per-reward advantages each function's reward `reward_columns`
    `[P, K, M]` and the weights `reward_weights` `[P, M]`.
    """
    valid_p = batch["pair_valid"] > 0
    real_pk = valid_p[:, None] & (jnp.nan_to_num(batch["sample_valid"]) > 0)
    extras = {}
    if "win_probs" in batch:
        extras["win_prob_gkk"] = jnp.where(valid_p[:, None, None],
                                           batch["win_probs"].astype(jnp.float32), 0.5)
    if "dpo_log_ratio" in scores:
        extras["dpo_log_ratio_nc"] = scores["dpo_log_ratio"]
    if "reward_columns" in batch:  # per-reward advantages: [P, K, M] columns, [P, M] weights
        columns = batch["reward_columns"].astype(jnp.float32)
        extras["reward_columns_nm"] = jnp.where(real_pk[..., None], columns, jnp.nan).reshape(
            -1, columns.shape[-1])
        extras["reward_weights_m"] = jnp.nanmax(batch["reward_weights"].astype(jnp.float32), 0)
    return losses.RolloutInputs(
        logps_nc=scores["logps"], mask_nc=batch["completion_mask"],
        rewards_n=jnp.where(real_pk, batch["rewards"], 0.0).reshape(-1).astype(jnp.float32),
        old_logps_nc=batch["old_logps"].astype(jnp.float32), ref_logps_nc=scores["ref"],
        entropy_nc=scores.get("entropy"), valid_n=real_pk.reshape(-1).astype(jnp.float32),
        values_nc=scores.get("values"), old_values_nc=_opt(batch, "old_values"), extras=extras)


def objective_inputs(setup: StepSetup, scores: dict, batch):
    """The objective's inputs from the per-token scores and the batch, by its inputs type.

    Sequences of one example are consecutive (`q = p K + j`): paired data interleaves chosen
    and rejected (and a triple's gold third); listwise data holds the K items of a list in
    order; unpaired data one labelled sequence per example.
    """
    kind, mask_qc, valid_p = setup.loss_kind, batch["completion_mask"], batch["pair_valid"]
    if kind == "pairwise":
        return pairwise_inputs(setup, scores, batch)
    if kind == "listwise":
        return losses.listwise_from_flat(scores["logps"], mask_qc,
                                         batch["scores"].astype(jnp.float32), scores["ref"],
                                         valid_p=valid_p, weight_p=_opt(batch, "weight"))
    if kind == "unpaired":
        kl = dict(zip(("kl_logps_nc", "kl_ref_logps_nc", "kl_mask_nc"),
                      scores.get("mismatched") or ()))
        return UnpairedInputs(logps_nc=scores["logps"], mask_nc=mask_qc,
                              label_n=batch["label"] > 0, ref_logps_nc=scores["ref"],
                              valid_n=valid_p, weight_n=_opt(batch, "weight"), **kl)
    if kind == "rollout":
        return rollout_inputs(scores, batch)
    if kind == "distill":  # every completion of every example
        k = mask_qc.shape[0] // valid_p.shape[0]
        weight = _opt(batch, "weight")
        return losses.DistillInputs(
            kl_nc=scores["kl"], teacher_weight_nc=scores["teacher_weight"], mask_nc=mask_qc,
            valid_n=jnp.repeat(valid_p, k), weight_n=None if weight is None
            else jnp.repeat(weight, k))
    raise ValueError(f"objectives of inputs {kind!r} do not train on preference batches; "
                     f"supported: {TRAINABLE_KINDS}")


TRAINABLE_KINDS = ("pairwise", "unpaired", "listwise", "distill", "rollout")


def zero_scores(setup: StepSetup, batch) -> dict:
    """Scores of the right shapes, all zero (for probing a stateful objective's state)."""
    zeros = jnp.zeros(batch["completion_mask"].shape, jnp.float32)
    scores = {"logps": zeros, "log_sum_p2": zeros, "kl": zeros, "teacher_weight": zeros,
              "token_rewards": zeros, "entropy": zeros,
              "ref": None if setup.reference.kind == "none" else zeros}
    if "token_rewards" in setup.needs:
        scores["dpo_log_ratio"] = zeros
    if setup.critic is not None:
        scores["values"] = zeros
    if setup.mismatched:
        scores["mismatched"] = (zeros, zeros, zeros)
    return scores


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


def trainable(setup: StepSetup, state: TrainState):
    """What the step differentiates: the policy's trainable params, and the critic's."""
    return state.params if setup.critic is None else (state.params, state.critic["params"])


def micro_loss(train_params, state: TrainState, batch, loss_state, total: jax.Array, setup):
    """Loss of one micro-batch scaled by the whole batch's example count, and its outputs."""
    critic_params = None
    if setup.critic is not None:
        train_params, critic_params = train_params
    # Unmerged adapters: the backward pass then needs no full [in, out] weight gradient.
    policy = policy_params(setup, state.replace(params=train_params), factored=True)
    inputs = objective_inputs(setup, score(setup, policy, state, batch, critic_params), batch)
    out = setup.objective(inputs, loss_state)
    scaled = jnp.sum(out.loss_p) / jnp.maximum(total, 1.0)
    tokens = jnp.sum(batch["completion_mask"].astype(jnp.float32))
    metrics = dict(out.metrics, tokens=(tokens, jnp.float32(1.0)))
    return scaled, (metrics, out.state)


def loss_total(setup, batch_m) -> jax.Array:
    """The count the whole batch's loss is divided by: its real examples; for rollout
    objectives the count the objective itself averages over (sequences or tokens, by its
    reduction), read from the objective on zero scores (counts depend on masks only)."""
    if getattr(setup, "loss_kind", None) != "rollout":
        return jnp.sum(batch_m["pair_valid"].astype(jnp.float32))

    def count(batch):
        inputs = objective_inputs(setup, zero_scores(setup, batch), batch)
        return setup.objective(inputs, None).metrics["loss"][1]

    return jnp.sum(jax.lax.map(count, batch_m))


def accumulate(setup, state: TrainState, batch_m, loss_fn=micro_loss):
    """Summed gradients, summed (sum, count) metrics and the final loss state over micro-batches.

    `loss_fn(train_params, state, batch, loss_state, total, setup) -> (scaled loss, (metrics,
    loss state))` is one micro-batch's loss (the policy's `micro_loss`; reward models have
    their own). One scan over all `m` micro-batches from zero sums, so the model is traced and
    compiled once (a length-1 scan is inlined by XLA; peeling the first micro-batch would
    compile it twice).
    """
    total = loss_total(setup, batch_m)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def scan_body(carry, batch):
        grads, metrics, loss_state = carry
        (_, (m_metrics, loss_state)), g = grad_fn(params, state, batch, loss_state, total,
                                                  setup)
        grads = jax.tree.map(jnp.add, grads, g)
        metrics = jax.tree.map(jnp.add, metrics, m_metrics)
        return (grads, metrics, loss_state), None

    params = trainable(setup, state) if loss_fn is micro_loss else state.params
    first = jax.tree.map(lambda x: x[0], batch_m)
    shapes = jax.eval_shape(lambda *a: grad_fn(*a, setup), params, state, first,
                            state.loss_state, total)
    (_, (metrics_shape, _)), grads_shape = shapes
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
    carry = (zeros(grads_shape), zeros(metrics_shape), state.loss_state)
    (grads, metrics, loss_state), _ = jax.lax.scan(scan_body, carry, batch_m)
    return grads, metrics, loss_state


def apply_gradients(setup: StepSetup, state: TrainState, grads):
    """Optimiser update; in float32 when `fp32_state`, then cast back to the params' dtypes."""
    return optim.apply_updates(setup.tx, state.params, state.opt_state, grads,
                               setup.fp32_state)


def optimizer_step(setup, state: TrainState, batch_m, loss_fn=micro_loss):
    """Gradients over the micro-batches, then the optimiser update; (state, metrics) (pure)."""
    grads, metrics, loss_state = accumulate(setup, state, batch_m, loss_fn)
    critic = state.critic
    if getattr(setup, "critic", None) is not None and loss_fn is micro_loss:
        grads, critic_grads = grads
        critic = critic_lib.update(setup.critic, critic, critic_grads, setup.fp32_state)
        metrics["critic/grad_norm"] = (optax.tree.norm(critic_grads), jnp.float32(1.0))
    params, opt_state = apply_gradients(setup, state, grads)
    rng, _ = jax.random.split(state.rng)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                          loss_state=loss_state, rng=rng, critic=critic)
    return state, dict(metrics, grad_norm=(optax.tree.norm(grads), jnp.float32(1.0)))


def train_step(setup: StepSetup, state: TrainState, batch_m) -> tuple[TrainState, Metrics]:
    """One optimiser step of the policy on a batch with a leading micro-batch axis (pure)."""
    state, metrics = optimizer_step(setup, state, batch_m)
    return setup.reference.after_step(state, policy_params(setup, state)), metrics


def init_state(setup: StepSetup, params, base, rest, loss_state, seed: int,
               frozen=None, critic=None) -> TrainState:
    """The initial TrainState from model Params (pure: run under jit with out_shardings);
    `critic`: the critic's initial `{"params", "rest"}` when the setup has one."""
    full = params if setup.lora is None else base
    opt_params = to_f32(params) if setup.fp32_state else params
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, base=base, rest=rest,
        ref=setup.reference.init(full), opt_state=setup.tx.init(opt_params),
        loss_state=loss_state, rng=jax.random.key_data(jax.random.key(seed)), frozen=frozen,
        critic=None if critic is None else critic_lib.init(setup.critic, critic,
                                                           setup.fp32_state))


def batch_shardings(batch_m: Mapping[str, Any], mesh: Mesh):
    """Batch arrays `[M, X, ...]` sharded over (data, fsdp) on X, the leading example axis.

    An axis the data-parallel size does not divide stays replicated (correct, just slower).
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def one(x):
        lead = BATCH_AXES if x.shape[1] % shards == 0 else None
        return NamedSharding(mesh, PartitionSpec(None, lead, *([None] * (len(x.shape) - 2))))

    return {k: one(v) for k, v in batch_m.items()}


def compile_train_step(setup, abstract_state: TrainState, batch_example, mesh: Mesh,
                       step_fn=train_step):
    """`step_fn(setup, state, batch)` jitted once with in/out shardings from logical axes; the
    state is donated. Returns (jitted step, state_shardings, batch_shardings).
    """
    state_sh = tree_shardings(abstract_state, mesh)
    batch_sh = batch_shardings(batch_example, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(lambda s, b: step_fn(setup, s, b), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=0)
    return step, state_sh, batch_sh

"""Bradley-Terry reward models: a Transformer trunk read by a `RewardHead` at the last reply token.

Shape letters: `m` micro-batches, `r` rows, `l` row length, `d` model width, `q` sequences
(chosen `2p`, rejected `2p + 1`), `c` completion positions, `p` pairs.

Training reuses the engine: the model and data specs (`loop.load_model`, `loop.make_loader`), the
mesh, the optimiser factory, `TrainState`, logical-axis shardings, `step.apply_gradients` and the
metrics writer. Only the forward differs from policy training (one score per sequence instead of
per-token log-probs), so only the loss and the step are written here. The trainer has the
signature of `loop.train`, so gin dispatches to it with `train.trainer = @train_reward_model`.

Under LoRA the trainable pytree is `{"lora": adapters, "head": head Params}`: the trunk's base
weights stay frozen (`TrainState.base`) and the head always trains.

Checkpoints are the policy loop's (`train.checkpoint`): the whole `TrainState` (params,
optimiser, step, RNG) and the loader position, every `LoopConfig.checkpoint_every` steps, at the
last step and on SIGTERM, keeping `keep_checkpoints`. Re-running the same command resumes from
the newest one and logs exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from prefopt_jax import data as data_lib
from prefopt_jax import losses
from prefopt_jax.losses.base import RewardPairInputs
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.heads import RewardHead, last_index
from prefopt_jax.train import build, loop as loop_lib, optim
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.checkpoint import Checkpointer
from prefopt_jax.train.metrics import MetricsWriter, means
from prefopt_jax.train.state import TrainState, to_f32, tree_shardings


class RewardModel(nnx.Module):
    """Trunk + head: one float32 score per sequence of a batch (docs/interfaces.md layout)."""

    def __init__(self, trunk: nnx.Module, head: RewardHead):
        self.trunk, self.head = trunk, head

    def __call__(self, batch) -> jax.Array:
        """Scores `[Q]`, read at each sequence's last completion token."""
        hidden_rld = self.trunk(batch["tokens"], batch["positions"], batch["segment_ids"],
                                batch["branch_ids"], return_hidden=True)
        r, l, d = hidden_rld.shape
        return self._read(hidden_rld.reshape(r * l, d), batch)

    def _read(self, hidden_nd, batch) -> jax.Array:
        index_q = last_token_index(batch["source_index"], batch["completion_mask"])
        hidden_q1d = hidden_nd[index_q][:, None]
        return self.head(hidden_q1d, index_b=jnp.zeros(hidden_q1d.shape[0], jnp.int32))


def last_token_index(source_index_qc, completion_mask_qc) -> jax.Array:
    """Flat index `r * L + t` `[Q]` of each sequence's last completion token, in any layout.

    The batch names only the *source* of each token (the position predicting it). Token c >= 1
    sits one past its source (token c - 1 of the same reply). Token 0 does too when the prompt
    has its own copy (padded, packed), but under prefix sharing every reply of an example has
    the shared prompt's last token as source, and the replies follow the prompt one after
    another in sequence order (data.layout, train.tiny): a 1-token reply's token sits past the
    earlier replies of its example, not right after the prompt. Replies of one example are
    recognised by their common first source; empty and filler sequences have length 0.
    """
    mask_qc = jnp.asarray(completion_mask_qc) > 0
    source_index_qc = jnp.asarray(source_index_qc, jnp.int32)
    last_q = last_index(mask_qc)
    source_last_q = jnp.take_along_axis(source_index_qc, last_q[:, None], axis=1)[:, 0]
    first_q = source_index_qc[:, 0]
    length_q = mask_qc.sum(axis=1).astype(jnp.int32)
    order_q = jnp.arange(first_q.shape[0])
    earlier_qq = (first_q[:, None] == first_q[None, :]) & (order_q[None, :] < order_q[:, None])
    start_q = first_q + 1 + jnp.sum(jnp.where(earlier_qq, length_q[None, :], 0), axis=1)
    return jnp.where(last_q >= 1, source_last_q + 1, start_q)


def new_reward_model(trunk: nnx.Module, init_scale: float = 0.1, seed: int = 0) -> RewardModel:
    """A trunk with a fresh float32 `RewardHead` (small init: scores start near 0)."""
    head = RewardHead(trunk.config.hidden_size, init_scale=init_scale, rngs=nnx.Rngs(seed))
    return RewardModel(trunk, head)


@dataclasses.dataclass(frozen=True)
class RMSetup:
    """Static parts of a reward-model step (the fields `step.apply_gradients` reads, and more)."""

    graphdef: Any
    tx: Any
    loss_fn: Any
    hyper: tuple
    lora: lora_lib.LoraConfig | None = None
    fp32_state: bool = True


def full_params(setup: RMSetup, trainable, base, factored: bool = False):
    """The reward model's Params: adapters merged into the trunk under LoRA, the trained head.

    `factored`: adapted kernels stay unmerged `LoraKernel`s, for the training forward.
    """
    if setup.lora is None:
        return trainable
    merged = lora_lib.apply_lora(base, trainable["lora"], setup.lora.scale, factored=factored)
    merged["head"] = trainable["head"]
    return merged


def pair_scores(setup: RMSetup, params, rest, batch) -> tuple[jax.Array, jax.Array]:
    """(r_w `[P]`, r_l `[P]`) of a paired batch under full Params."""
    scores_q = nnx.merge(setup.graphdef, params, rest)(batch)
    return scores_q[0::2], scores_q[1::2]


def _opt(batch, key):
    return None if key not in batch else batch[key].astype(jnp.float32)


def micro_loss(trainable, state: TrainState, batch, total, setup: RMSetup):
    """Bradley-Terry loss of one micro-batch, scaled by the whole batch's pair count."""
    params = full_params(setup, trainable, state.base, factored=True)
    r_w, r_l = pair_scores(setup, params, state.rest, batch)
    inputs = RewardPairInputs(r_w, r_l, margin_p=_opt(batch, "margin"),
                              valid_p=batch["pair_valid"], weight_p=_opt(batch, "weight"))
    out = setup.loss_fn(inputs, None, **dict(setup.hyper))
    return jnp.sum(out.loss_p) / jnp.maximum(total, 1.0), out.metrics


def rm_step(setup: RMSetup, state: TrainState, batch_m):
    """One optimiser step over a batch with a leading micro-batch axis (pure)."""
    total = jnp.sum(batch_m["pair_valid"].astype(jnp.float32))
    grad_fn = jax.grad(micro_loss, has_aux=True)

    def body(carry, batch):
        grads, metrics = carry
        g, m = grad_fn(state.params, state, batch, total, setup)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

    first = jax.tree.map(lambda x: x[0], batch_m)
    shapes = jax.eval_shape(lambda: grad_fn(state.params, state, first, total, setup))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, metrics), _ = jax.lax.scan(body, zeros, batch_m)
    params, opt_state = step_lib.apply_gradients(setup, state, grads)
    tokens = jnp.sum(batch_m["completion_mask"].astype(jnp.float32))  # every host's
    metrics = dict(metrics, grad_norm=(optax.tree.norm(grads), jnp.float32(1.0)),
                   tokens=(tokens, jnp.float32(1.0)))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def split_reward_model(rm: RewardModel, lora: lora_lib.LoraConfig | None, seed: int):
    """(graphdef, trainable, base, rest): trunk LoRA adapters plus the head, or all Params."""
    graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
    if lora is None:
        return graphdef, params, None, rest
    adapters = lora_lib.init_adapters(params["trunk"], lora, jax.random.key(seed + 1))
    adapters = {f"trunk/{k}": v for k, v in adapters.items()}
    return graphdef, {"lora": adapters, "head": params["head"]}, params, rest


class BuiltRM(NamedTuple):
    """What `build_rm` returns: the static setup, the sharded state, the jitted step."""

    setup: RMSetup
    state: TrainState
    step_fn: Any
    batch_sh: dict
    abstract: Any
    state_sh: Any


def build_rm(rm: RewardModel, algo: build.AlgoConfig, optim_config: optim.OptimConfig, probe_m,
             mesh, lora: lora_lib.LoraConfig | None = None, seed: int = 0) -> BuiltRM:
    """The sharded state, the jitted donating step, and the abstract state and its shardings."""
    info = losses.info(algo.loss)
    if info.kind != "reward":
        raise ValueError(f"reward models train on a reward objective (e.g. bradley_terry), "
                         f"not {algo.loss!r} ({info.kind})")
    graphdef, trainable, base, rest = split_reward_model(rm, lora, seed)
    setup = RMSetup(graphdef, optim.build_optimizer(optim_config), losses.get(algo.loss),
                    tuple(sorted(dict(algo.hyper).items())), lora, optim_config.fp32_state)

    def init(p, b, r):
        opt_params = to_f32(p) if setup.fp32_state else p
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, base=b, rest=r, ref=None,
                          opt_state=setup.tx.init(opt_params), loss_state=None,
                          rng=jax.random.key_data(jax.random.key(seed)))

    abstract = jax.eval_shape(init, trainable, base, rest)
    state_sh = tree_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        args = jax.device_put((trainable, base, rest), tree_shardings((trainable, base, rest),
                                                                      mesh))
        state = jax.jit(init, out_shardings=state_sh)(*args)
    batch_sh = step_lib.batch_shardings(probe_m, mesh)
    step_fn = jax.jit(lambda s, b: rm_step(setup, s, b), in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
                      donate_argnums=0)
    return BuiltRM(setup, state, step_fn, batch_sh, abstract, state_sh)


def trained_model(setup: RMSetup, state: TrainState) -> RewardModel:
    """The trained reward model as a plain NNX module (LoRA merged), on the host.

    Call on every process: parameters sharded over hosts are gathered (`loop.to_host`).
    """
    params = loop_lib.to_host(full_params(setup, state.params, state.base))
    return nnx.merge(setup.graphdef, params, loop_lib.to_host(state.rest))


def fit(rm: RewardModel, loader: data_lib.Loader, algo: build.AlgoConfig,
        optim_config: optim.OptimConfig, steps: int, *, mesh=None, lora=None, micro_batches=1,
        seed: int = 0, writer: MetricsWriter | None = None, ckpt: Checkpointer | None = None,
        checkpoint_every: int = 0, stop=None) -> tuple[RewardModel, dict]:
    """Train `rm` to `steps` on `loader`'s pairs; returns (trained model, last metric means).

    With `ckpt`: first resume from its newest checkpoint (state, optimiser, step, RNG, loader
    position), then save every `checkpoint_every` steps (0: never), at `steps` and when
    `stop.agreed()` (a `loop.Stop`, set by SIGTERM on any host), which also ends the run early.
    """
    mesh = mesh or sharding_lib.make_mesh((1, 1, 1))
    probe = loop_lib.next_batch_m(loader, micro_batches)
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 0})
    built = build_rm(rm, algo, optim_config, probe, mesh, lora, seed)
    state, first = built.state, 0
    if ckpt is not None and ckpt.latest_step():
        first = ckpt.latest_step()
        state, data_state = ckpt.restore(first, built.abstract, built.state_sh)
        loader.load_state_dict(data_state)
    state, values = run_steps(built, state, loader, range(first + 1, steps + 1), micro_batches,
                              mesh, writer, ckpt, checkpoint_every, stop)
    return trained_model(built.setup, state), values


def run_steps(built: BuiltRM, state, loader, steps, micro_batches, mesh, writer, ckpt,
              checkpoint_every: int, stop) -> tuple[TrainState, dict]:
    """Steps `steps` (1-based numbers): step, check, log, checkpoint; (state, last means)."""
    values, tokens = {}, 0.0
    with jax.set_mesh(mesh):
        for step in steps:
            batch_m = loop_lib.next_batch_m(loader, micro_batches)
            state, metrics = built.step_fn(state, loop_lib.to_global(batch_m, built.batch_sh))
            values = means(metrics)
            loop_lib.check_finite(step, values, batch_m, ckpt and ckpt.latest_step())
            tokens += float(jax.device_get(metrics["tokens"][0]))  # the global batch's
            if writer is not None:
                writer.write(step, values)
                writer.progress(step, values, tokens)
            stopping = stop is not None and stop.agreed()
            due = checkpoint_every and (step % checkpoint_every == 0 or step == steps[-1])
            if ckpt is not None and (due or stopping):
                ckpt.save(step, state, loader.state_dict(), force=True)
            if stopping:
                print(f"SIGTERM: checkpointed step {step}; restart to resume", flush=True)
                break
    return state, values


_scores = jax.jit(lambda graphdef, params, batch: nnx.merge(graphdef, params)(batch),
                  static_argnums=0)


def score_pairs(rm: RewardModel, data: data_lib.TokenizedData, batch_size: int = 16,
                layout: data_lib.LayoutConfig = data_lib.LayoutConfig()) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """(r_w `[P]`, r_l `[P]`) for every pair of `data`, in order (filler dropped)."""
    graphdef, params = nnx.split(rm)
    loader = data_lib.Loader(data, min(batch_size, len(data)), layout, shuffle=False)
    r_w, r_l = [], []
    for batch in loader:
        scores_q = np.asarray(_scores(graphdef, params, batch))
        real_p = batch["pair_valid"] > 0
        r_w.append(scores_q[0::2][real_p])
        r_l.append(scores_q[1::2][real_p])
    return np.concatenate(r_w), np.concatenate(r_l)


def save(rm: RewardModel, directory: str, tokenizer=None) -> str:
    """The trunk in Hugging Face format (`trunk/`) and the head's Params (`head.npz`)."""
    from prefopt_jax.models import save_pretrained

    save_pretrained(rm.trunk, os.path.join(directory, "trunk"), tokenizer)
    head = nnx.to_pure_dict(nnx.state(rm.head, nnx.Param))
    np.savez(os.path.join(directory, "head.npz"), kernel=np.asarray(head["out"]["kernel"]),
             bias=np.asarray(head["out"]["bias"]))
    return directory


def load(directory: str, dtype=jnp.float32) -> tuple[RewardModel, Any]:
    """(reward model, tokenizer) written by `save`."""
    from prefopt_jax.models import from_pretrained

    trunk, tokenizer = from_pretrained(os.path.join(directory, "trunk"), dtype=dtype)
    rm = new_reward_model(trunk)
    with np.load(os.path.join(directory, "head.npz")) as z:
        rm.head.out.kernel.set_value(jnp.asarray(z["kernel"]))
        rm.head.out.bias.set_value(jnp.asarray(z["bias"]))
    return rm, tokenizer


def heldout_data(source: str, tokenizer, max_length: int | None) -> data_lib.TokenizedData:
    """Held-out pairs of a file, tokenised like the training data."""
    config = data_lib.DataConfig(max_length=max_length)
    return data_lib.prepare(data_lib.open_source(source), tokenizer, config)[0]


@gin.configurable("train_reward_model")
def train(model_spec, data_spec, algo, optim_config, loop_config, *, heldout: str | None = None,
          init_scale: float = 0.1) -> dict:
    """Train a reward model from gin specs; save it and report held-out accuracy/calibration."""
    from prefopt_jax.evals import calibration

    trunk, tokenizer = loop_lib.load_model(model_spec)
    rm = new_reward_model(trunk, init_scale, loop_config.seed + 2)
    mesh = sharding_lib.make_mesh(loop_config.mesh_shape)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    loader = loop_lib.make_loader(data_spec, tokenizer, loop_config.seed,
                                  trunk.config.vocab_size, shards)
    ckpt = Checkpointer(os.path.join(loop_config.output_dir, "checkpoints"),
                        loop_config.keep_checkpoints)
    writer = MetricsWriter(loop_config.output_dir, loop_config.steps, ckpt.latest_step() or 0)
    stop = loop_lib.Stop()
    try:
        rm, values = fit(rm, loader, algo, optim_config, loop_config.steps, mesh=mesh,
                         lora=model_spec.lora, micro_batches=data_spec.micro_batches,
                         seed=loop_config.seed, writer=writer, ckpt=ckpt,
                         checkpoint_every=loop_config.checkpoint_every, stop=stop)
    finally:
        # Also on a non-finite stop: pending asynchronous saves finish before the error leaves.
        ckpt.close()
        writer.close()
    if jax.process_index() != 0 or stop.requested:
        return values
    if loop_config.export:
        save(rm, os.path.join(loop_config.output_dir, "reward_model"), tokenizer)
    if heldout and data_spec.source != "tiny":
        r_w, r_l = score_pairs(rm, heldout_data(heldout, tokenizer, data_spec.max_length))
        report = calibration.pair_report(r_w, r_l)
        with open(os.path.join(loop_config.output_dir, "heldout.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"held-out: accuracy {report['accuracy']:.3f} ECE {report['ece']:.3f} "
              f"({report['pairs']} pairs)", flush=True)
        values = dict(values, heldout_accuracy=report["accuracy"], heldout_ece=report["ece"])
    return values

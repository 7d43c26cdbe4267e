"""Bradley-Terry reward-model training: a task of the shared driver (`train.driver`).

Shape letters: `m` micro-batches, `q` sequences (chosen `2p`, rejected `2p + 1`), `p` pairs.

The model (`rewards.reward_model.RewardModel`: a Transformer trunk read by a `RewardHead` at
the last reply token) and its files live in the rewards room; here only what differs from
policy training: one score per sequence instead of per-token log-probs, so the micro-batch
loss and the export. Everything else is the engine's: model and data specs, the mesh, the
optimiser, `TrainState`, logical-axis shardings, gradient accumulation (`step.optimizer_step`)
and the driver (checkpoints every `LoopConfig.checkpoint_every` steps, at the last step and on
SIGTERM; exact resume; metrics). `prefopt train` runs this task for objectives with reward
inputs (`bradley_terry`).

Under LoRA the trainable pytree is `{"lora": adapters, "head": head Params}`: the trunk's base
weights stay frozen (`TrainState.base`) and the head always trains.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.losses.base import RewardPairInputs
from prefopt_jax.losses.registry import ObjectiveError
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.spec import load_model
from prefopt_jax.rewards import calibration
from prefopt_jax.rewards.reward_model import (RewardModel, new_reward_model, save,
                                              score_pairs)
from prefopt_jax.train import build, driver, loop as loop_lib, optim
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.state import TrainState, to_f32, tree_shardings


@dataclasses.dataclass(frozen=True)
class RMSetup:
    """Static parts of a reward-model step (the fields `step.apply_gradients` reads, and more)."""

    graphdef: Any
    tx: Any
    objective: Any
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


def micro_loss(trainable, state: TrainState, batch, loss_state, total, setup: RMSetup):
    """Bradley-Terry loss of one micro-batch, scaled by the whole batch's pair count."""
    params = full_params(setup, trainable, state.base, factored=True)
    r_w, r_l = pair_scores(setup, params, state.rest, batch)
    inputs = RewardPairInputs(r_w, r_l, margin_p=_opt(batch, "margin"),
                              valid_p=batch["pair_valid"], weight_p=_opt(batch, "weight"))
    out = setup.objective(inputs, loss_state)
    tokens = jnp.sum(batch["completion_mask"].astype(jnp.float32))
    metrics = dict(out.metrics, tokens=(tokens, jnp.float32(1.0)))
    return jnp.sum(out.loss_p) / jnp.maximum(total, 1.0), (metrics, out.state)


def rm_step(setup: RMSetup, state: TrainState, batch_m):
    """One optimiser step over a batch with a leading micro-batch axis (pure)."""
    return step_lib.optimizer_step(setup, state, batch_m, micro_loss)


def split_reward_model(rm: RewardModel, lora: lora_lib.LoraConfig | None, seed: int):
    """(graphdef, trainable, base, rest): trunk LoRA adapters plus the head, or all Params."""
    graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
    if lora is None:
        return graphdef, params, None, rest
    adapters = lora_lib.init_adapters(params["trunk"], lora, jax.random.key(seed + 1))
    adapters = {f"trunk/{k}": v for k, v in adapters.items()}
    return graphdef, {"lora": adapters, "head": params["head"]}, params, rest


def trained_model(setup: RMSetup, state: TrainState) -> RewardModel:
    """The trained reward model as a plain NNX module (LoRA merged), on the host.

    Call on every process: parameters sharded over hosts are gathered (`driver.to_host`).
    """
    params = driver.to_host(full_params(setup, state.params, state.base))
    return nnx.merge(setup.graphdef, params, driver.to_host(state.rest))


class RewardModelTask(driver.LoaderTask):
    """Bradley-Terry training of `rm` on `loader`'s pairs (`driver.Task`)."""

    def __init__(self, rm: RewardModel, loader: data_lib.Loader, algo: build.AlgoConfig,
                 optim_config: optim.OptimConfig, *, mesh=None, lora=None, micro_batches=1,
                 seed: int = 0, tokenizer=None, heldout=None):
        objective = algo.objective()
        if objective.info.inputs != "reward":
            raise ObjectiveError(f"reward models train on a reward objective (e.g. "
                                 f"bradley_terry), not {objective.name!r} "
                                 f"({objective.info.inputs} inputs)")
        self.mesh = mesh or sharding_lib.make_mesh((1, 1, 1))
        self.loader, self.micro_batches = loader, micro_batches
        self.tokenizer, self.heldout = tokenizer, heldout
        probe = driver.next_batch_m(loader, micro_batches)
        loader.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 0})
        graphdef, trainable, base, rest = split_reward_model(rm, lora, seed)
        self.setup = RMSetup(graphdef, optim.build_optimizer(optim_config), objective, lora,
                             optim_config.fp32_state)

        def init(p, b, r):
            opt_params = to_f32(p) if self.setup.fp32_state else p
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, base=b, rest=r, ref=None,
                              opt_state=self.setup.tx.init(opt_params), loss_state=None,
                              rng=jax.random.key_data(jax.random.key(seed)))

        self.abstract = jax.eval_shape(init, trainable, base, rest)
        self.state_sh = tree_shardings(self.abstract, self.mesh)
        with jax.set_mesh(self.mesh):
            args = jax.device_put((trainable, base, rest),
                                  tree_shardings((trainable, base, rest), self.mesh))
            self.state = jax.jit(init, out_shardings=self.state_sh)(*args)
        self.step_fn, _, self.batch_sh = step_lib.compile_train_step(
            self.setup, self.abstract, probe, self.mesh, rm_step)

    def model(self) -> RewardModel:
        """The trained reward model on the host (call on every process)."""
        return trained_model(self.setup, self.state)

    def export(self, output_dir: str) -> None:
        """`output_dir/reward_model`: the trunk in HF format and `head.npz`."""
        rm = self.model()
        if jax.process_index() == 0:
            save(rm, os.path.join(output_dir, "reward_model"), self.tokenizer)
        driver.sync("export: reward_model")

    def report(self, values: dict) -> dict:
        """Held-out accuracy and calibration (`heldout.json`) when held-out pairs are given."""
        if self.heldout is None:
            return values
        rm = self.model()
        if jax.process_index() != 0:
            return values
        r_w, r_l = score_pairs(rm, self.heldout["data"])
        report = calibration.pair_report(r_w, r_l)
        with open(os.path.join(self.heldout["output_dir"], "heldout.json"), "w") as f:
            json.dump(report, f, indent=1)
        print(f"held-out: accuracy {report['accuracy']:.3f} ECE {report['ece']:.3f} "
              f"({report['pairs']} pairs)", flush=True)
        return dict(values, heldout_accuracy=report["accuracy"], heldout_ece=report["ece"])


def fit(rm: RewardModel, loader: data_lib.Loader, algo: build.AlgoConfig,
        optim_config: optim.OptimConfig, steps: int, output_dir: str, **task_kw
        ) -> tuple[RewardModel, dict]:
    """Train `rm` to `steps` on `loader`'s pairs with the driver (metrics, checkpoints and
    resume under `output_dir`); returns (trained model, last metric means)."""
    task = RewardModelTask(rm, loader, algo, optim_config, **task_kw)
    values = driver.run(task, steps, output_dir, checkpoint_every=0, export=False)
    return task.model(), values


def heldout_data(source: str, tokenizer, max_length: int | None) -> data_lib.TokenizedData:
    """Held-out pairs of a file, tokenised like the training data."""
    config = data_lib.DataConfig(max_length=max_length)
    return data_lib.prepare(data_lib.open_source(source), tokenizer, config)[0]


@gin.configurable("train_reward_model")
def train(model_spec, data_spec, algo, optim_config, loop_config, *, heldout: str | None = None,
          init_scale: float = 0.1) -> dict:
    """Train a reward model from gin specs; save it and report held-out accuracy/calibration."""
    return driver.run_config(lambda: reward_model_task(
        model_spec, data_spec, algo, optim_config, loop_config, heldout, init_scale), loop_config)


def reward_model_task(model_spec, data_spec, algo, optim_config, loop_config,
                      heldout: str | None, init_scale: float) -> RewardModelTask:
    """The task `train` runs: a new reward head on the model, the data, held-out pairs."""
    loop_lib.check_sources(model_spec, data_spec)
    trunk, tokenizer = load_model(model_spec)
    rm = new_reward_model(trunk, init_scale, loop_config.seed + 2)
    mesh = sharding_lib.make_mesh(loop_config.mesh_shape)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    loader = loop_lib.make_loader(data_spec, tokenizer, loop_config.seed,
                                  trunk.config.vocab_size, shards)
    held = None
    if heldout and data_spec.source != "tiny":
        held = {"data": heldout_data(heldout, tokenizer, data_spec.max_length),
                "output_dir": loop_config.output_dir}
    optim_config = optim.for_run(optim_config, loop_config.steps)
    return RewardModelTask(rm, loader, algo, optim_config, mesh=mesh, lora=model_spec.lora,
                           micro_batches=data_spec.micro_batches, seed=loop_config.seed,
                           tokenizer=tokenizer, heldout=held)


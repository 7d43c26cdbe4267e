"""Diffusion training on the shared driver: pre-training and every diffusion objective.

`prefopt train` picks this task for objectives with diffusion inputs (`losses.DIFFUSION_INPUTS`).
The objective's declaration says what a step needs; the task supplies it:

  images              images and labels: the denoising error of each (`diffusion_mse`);
  denoising           chosen and rejected images: policy and reference errors at one shared t
                      and noise per pair (`diffusion_dpo`, `seppo`);
  denoising_unpaired  labelled images (`diffusion_kto`); denoising_list  K scored images
                      (`rank_dpo`);
  trajectory          trajectories sampled from the current policy each step (`d3po`, `ddpo`):
                      `group_size` per prompt from one start noise (D3PO's pairs), rewarded by
                      `DiffusionConfig.reward`; the step recomputes each transition's log-prob
                      under the policy (gradient) and the reference, averaged over pixels by
                      default (`DiffusionConfig.logp_per_pixel`);
  reference_samples   (SePPO) the reference is a previous policy snapshot drawn at random every
                      `reference_every` steps, and its own sample for each prompt replaces the
                      rejected image.

Noise: row `i` of a step draws its t, its noise and its label drop from `fold_in(rng, i)` where
`rng` is the state's key (split every step), so micro-batching, sharding and the number of hosts
leave every draw, and so the update, unchanged. Everything else (optimiser, gradient
accumulation, logical-axis shardings, checkpoints, exact resume, SIGTERM, metrics) is the
engine's (`train.step`, `train.driver`). The trained model is exported as a diffusion model
directory (`diffusion.spec`), the `source` of a later run's `DiffusionModelSpec`.

Shape letters: `m` micro-batches, `n` rows (images, pairs, lists or trajectories), `k` list
items, `s` sampler steps, `h`, `w`, `c` image axes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax import losses
from prefopt_jax.diffusion import data as data_lib
from prefopt_jax.diffusion import sampling, spec as spec_lib
from prefopt_jax.diffusion.schedules import Schedule, target
from prefopt_jax.errors import ConfigError
from prefopt_jax.losses import diffusion as dl
from prefopt_jax.losses.registry import DIFFUSION_INPUTS, ObjectiveError
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.train import build, driver, optim
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.loop import LoopConfig
from prefopt_jax.train.metrics import means
from prefopt_jax.train.state import TrainState, to_f32, tree_shardings


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """How diffusion objectives train (gin: `DiffusionConfig`, bound as
    `train_diffusion.diffusion`).

    Attributes:
      label_dropout: the share of rows trained with the null label (classifier-free guidance;
        0.1 is usual for pre-training, 0 for fine-tuning).
      sampler: "ddpm" or "ddim" for trajectory objectives and SePPO's reference samples.
      sample_steps: the sampler's steps S.
      eta: DDIM's eta (trajectories need eta > 0 or ddpm: deterministic steps have no density).
      guidance: classifier-free guidance scale while sampling.
      clip_x0: clip the predicted clean image to [-clip_x0, clip_x0] while sampling (None: no).
      prompts_per_step: prompts (labels) drawn per step by trajectory objectives.
      group_size: trajectories per prompt, from one start noise (even: D3PO pairs rows 2p, 2p+1).
      train_fraction: the share of each trajectory's steps trained on (DDPO/D3PO's
        timestep_fraction), drawn per trajectory.
      reward: the reward of final images (`diffusion.rewards.resolve_reward`): "classifier",
        "classifier:PATH", "contrast" or "module:function".
      reference_every: SePPO: snapshot the policy and redraw the reference every this many steps.
      reference_pool: SePPO: how many snapshots are kept (the oldest go first).
      logp_per_pixel: trajectory objectives read each step's Gaussian log-prob averaged over
        the pixels, as DDPO's and D3PO's released code does (their clip ranges and betas are
        set for it); False: the density summed over pixels, which is the sampler's own
        (`sampling.Trajectory.logps_sb`) and makes every ratio `H*W*C` times as sensitive.
    """

    label_dropout: float = 0.0
    sampler: str = "ddpm"
    sample_steps: int = 10
    eta: float = 1.0
    guidance: float = 1.0
    clip_x0: float | None = 1.0
    prompts_per_step: int = 4
    group_size: int = 2
    train_fraction: float = 1.0
    reward: str = "contrast"
    reference_every: int = 10
    reference_pool: int = 4
    logp_per_pixel: bool = True

    def __post_init__(self):
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"DiffusionConfig.label_dropout={self.label_dropout}; must lie "
                              "in [0, 1)")
        if self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"DiffusionConfig.group_size={self.group_size}: trajectories come "
                              "in pairs from one start noise (D3PO); use an even number >= 2")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"DiffusionConfig.train_fraction={self.train_fraction}; must lie "
                              "in (0, 1]")
        if self.reference_every < 1 or self.reference_pool < 1:
            raise ConfigError("DiffusionConfig.reference_every and reference_pool must be >= 1")
        try:
            self.sampler_config()
        except ValueError as err:
            raise ConfigError(f"DiffusionConfig: {err}") from None

    def sampler_config(self) -> sampling.SamplerConfig:
        return sampling.SamplerConfig(method=self.sampler, num_steps=self.sample_steps,
                                      eta=self.eta, guidance=self.guidance, clip_x0=self.clip_x0)


@dataclasses.dataclass(frozen=True)
class DiffusionSetup:
    """Static parts of a diffusion step (the fields `step.optimizer_step` reads, and more)."""

    graphdef: Any
    tx: Any
    objective: Any
    schedule: Schedule
    sampler: sampling.SamplerConfig
    label_dropout: float = 0.0
    fp32_state: bool = True
    logp_scale: float = 1.0  # trajectory log-probs times this (1 / pixels: per-pixel means)

    @property
    def kind(self) -> str:
        return self.objective.info.inputs


# --- the step -------------------------------------------------------------------------------

def row_draws(setup: DiffusionSetup, rng, row_n, shape_hwc) -> tuple:
    """Each row's (t, noise, keep-label) from `fold_in(rng, row)`: independent of the layout."""
    def one(row):
        k_t, k_eps, k_drop = jax.random.split(jax.random.fold_in(rng, row), 3)
        t = jax.random.randint(k_t, (), 0, setup.schedule.num_steps)
        eps = jax.random.normal(k_eps, shape_hwc, jnp.float32)
        return t, eps, jax.random.uniform(k_drop) >= setup.label_dropout

    return jax.vmap(one)(row_n)


def errors(setup: DiffusionSetup, model, x0_nhwc, labels_n, t_n, eps_nhwc) -> jax.Array:
    """`mean_pixels (target - model(x_t, t, label))^2` per image, float32 `[N]`."""
    alpha, sigma = setup.schedule.alpha_sigma(t_n)
    x_t = alpha * x0_nhwc + sigma * eps_nhwc
    want = target(x0_nhwc, eps_nhwc, alpha, sigma, model.prediction)
    return jnp.mean(jnp.square(want - model(x_t, t_n, labels_n)), axis=(1, 2, 3))


def _models(setup: DiffusionSetup, params, state: TrainState):
    policy = nnx.merge(setup.graphdef, params, state.rest)
    ref = None if state.ref is None else nnx.merge(
        setup.graphdef, jax.lax.stop_gradient(state.ref), state.rest)
    return policy, ref


def _both(setup, policy, ref, x_nhwc, labels_n, t_n, eps_nhwc):
    """(policy errors, reference errors) of the same noised images."""
    err = errors(setup, policy, x_nhwc, labels_n, t_n, eps_nhwc)
    ref_err = jax.lax.stop_gradient(errors(setup, ref, x_nhwc, labels_n, t_n, eps_nhwc))
    return err, ref_err


def denoising_inputs(setup: DiffusionSetup, policy, ref, batch, rng):
    """The objective's inputs for image kinds (chosen and rejected share t and noise)."""
    valid_n, labels_n = batch["pair_valid"], batch["label_n"]
    first = next(v for k, v in batch.items() if k.endswith("hwc"))
    t_n, eps, keep_n = row_draws(setup, rng, batch["row_n"], first.shape[-3:])
    labels_n = jnp.where(keep_n, labels_n, policy.null_label)
    if setup.kind == "images":
        err = errors(setup, policy, batch["image_nhwc"], labels_n, t_n, eps)
        return dl.ImageInputs(err, valid_n)
    if setup.kind == "denoising":
        both = jnp.concatenate([batch["chosen_nhwc"], batch["rejected_nhwc"]])
        twice = lambda x: jnp.concatenate([x, x])  # noqa: E731
        err, ref_err = _both(setup, policy, ref, both, twice(labels_n), twice(t_n), twice(eps))
        (e_w, e_l), (r_w, r_l) = jnp.split(err, 2), jnp.split(ref_err, 2)
        return dl.DenoisingInputs(e_w, e_l, r_w, r_l, valid_n)
    if setup.kind == "denoising_unpaired":
        err, ref_err = _both(setup, policy, ref, batch["image_nhwc"], labels_n, t_n, eps)
        return dl.DenoisingUnpairedInputs(err, ref_err, batch["desirable_n"], valid_n)
    images = batch["images_nkhwc"]  # denoising_list: one t and noise per list
    n, k = images.shape[:2]
    rep = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
    err, ref_err = _both(setup, policy, ref, images.reshape(n * k, *images.shape[2:]),
                         rep(labels_n), rep(t_n), rep(eps))
    return dl.DenoisingListInputs(err.reshape(n, k), ref_err.reshape(n, k), batch["scores_nk"],
                                  batch["item_valid_nk"], valid_n)


def trajectory_inputs(setup: DiffusionSetup, policy, ref, batch) -> dl.TrajectoryInputs:
    """Each sampled transition's log-prob under the policy (gradient) and the reference."""
    xs_snhwc = jnp.moveaxis(batch["xs_nshwc"], 1, 0)
    scale = setup.logp_scale
    logps = lambda m: scale * sampling.step_logps(  # noqa: E731
        m, xs_snhwc, batch["label_n"], schedule=setup.schedule, config=setup.sampler).T
    ref_ns = None if ref is None else jax.lax.stop_gradient(logps(ref))
    return dl.TrajectoryInputs(logps(policy), batch["mask_ns"], batch["reward_n"],
                               ref_logps_ns=ref_ns, old_logps_ns=scale * batch["old_logps_ns"],
                               prompt_id_n=batch["prompt_id_n"], valid_n=batch["pair_valid"])


def micro_loss(params, state: TrainState, batch, loss_state, total, setup: DiffusionSetup):
    """One micro-batch's loss, scaled by the whole batch's row count (`step.accumulate`)."""
    policy, ref = _models(setup, params, state)
    if setup.kind == "trajectory":
        inputs = trajectory_inputs(setup, policy, ref, batch)
    else:
        inputs = denoising_inputs(setup, policy, ref, batch, state.rng)
    out = setup.objective(inputs, loss_state)
    return jnp.sum(out.loss_p) / jnp.maximum(total, 1.0), (out.metrics, out.state)


def diffusion_step(setup: DiffusionSetup, state: TrainState, batch_m):
    """One optimiser step over a batch with a leading micro-batch axis (pure)."""
    return step_lib.optimizer_step(setup, state, batch_m, micro_loss)


# --- the task -------------------------------------------------------------------------------

def diffusion_objectives() -> list[str]:
    """The registered objectives this task trains."""
    return [n for n in losses.names() if losses.info(n).inputs in DIFFUSION_INPUTS]


def check_objective(objective, algo: build.AlgoConfig) -> None:
    """Refuse objectives this task cannot train and references it cannot supply."""
    kind = objective.info.inputs
    if kind not in DIFFUSION_INPUTS:
        raise ObjectiveError(f"objective {objective.name!r} reads {kind} inputs, not a diffusion "
                             f"model's; diffusion objectives: "
                             f"{', '.join(diffusion_objectives())}")
    ref = algo.reference.kind
    if objective.info.reference and ref not in ("auto", "frozen"):
        raise ObjectiveError(f"objective {objective.name!r}: diffusion models keep a frozen "
                             f"copy as the reference (ReferenceConfig.kind 'auto' or 'frozen'), "
                             f"not {ref!r}")
    if algo.reference.soft_update_every:
        raise ObjectiveError("ReferenceConfig.soft_update_every: the diffusion trainer has no "
                             "soft reference update")


def local_rows(batch: dict, shardings: dict) -> dict:
    """Global arrays from a global numpy batch `[M, N, ...]` every host holds (each host gives
    its devices' rows; replicated arrays whole)."""
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for name, value in batch.items():
        sh = shardings[name]
        local = value
        if count > 1 and len(sh.spec) > 1 and sh.spec[1] is not None:
            rows = value.shape[1] // count
            local = value[:, index * rows:(index + 1) * rows]
        out[name] = jax.make_array_from_process_local_data(sh, local, value.shape)
    return out


def micro(batch: dict, count: int) -> dict:
    """`[N, ...]` arrays as `[count, N / count, ...]` micro-batches."""
    return {k: v.reshape(count, v.shape[0] // count, *v.shape[1:]) for k, v in batch.items()}


class DiffusionTask:
    """A diffusion objective on the driver (`driver.Task`): data or sampled trajectories per
    step, the jitted sharded step, SePPO's reference snapshots, the export.

    `reward_fn`: a Python callable `fn(images_nhwc, labels_n) -> rewards_n` rewarding the
    trajectories instead of `config.reward` (the Python API's way to pass any function).
    """

    def __init__(self, model_spec: spec_lib.DiffusionModelSpec, data_spec: data_lib.ImageDataSpec,
                 algo: build.AlgoConfig, optim_config: optim.OptimConfig, loop: LoopConfig,
                 config: DiffusionConfig = DiffusionConfig(), reward_fn=None):
        objective = algo.objective()
        check_objective(objective, algo)
        build.check_accumulation(objective, data_spec.micro_batches)
        model, schedule = spec_lib.load(model_spec)
        self.config, self.loop, self.seed = config, loop, loop.seed
        self.micro_batches, self.image_shape = data_spec.micro_batches, model.image_shape
        self.mesh = sharding_lib.make_mesh(loop.mesh_shape)
        kind = objective.info.inputs
        arrays = data_lib.load(data_spec, data_lib.DATA_OF_INPUTS[kind], model.image_shape,
                               model.config.num_classes, loop.seed)
        rows = config.prompts_per_step if kind == "trajectory" else data_spec.batch_size
        self.loader = data_lib.ImageLoader(arrays, rows, loop.seed)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        pixels = int(np.prod(model.image_shape))
        self.setup = DiffusionSetup(graphdef, optim.build_optimizer(optim_config), objective,
                                    schedule, config.sampler_config(), config.label_dropout,
                                    optim_config.fp32_state,
                                    logp_scale=1.0 / pixels if config.logp_per_pixel else 1.0)
        self.needs = objective.info.active_needs(objective.hyper)
        if kind == "trajectory" and not config.sampler_config().stochastic:
            raise ConfigError("DiffusionConfig: trajectory objectives need step densities: "
                              "sampler 'ddpm', or 'ddim' with eta > 0")
        if kind == "trajectory" and reward_fn is None:
            from prefopt_jax.diffusion import rewards
            reward_fn = rewards.resolve_reward(config.reward)
        self.reward_fn = reward_fn
        self._place(params, rest, objective.info.reference)
        probe = self.next_batch(1, peek=True)
        probe.pop("example_index")
        self.step_fn, _, self.batch_sh = step_lib.compile_train_step(
            self.setup, self.abstract, probe, self.mesh, diffusion_step)

    def _place(self, params, rest, reference: bool) -> None:
        seppo = "reference_samples" in self.needs
        pool = self.config.reference_pool

        def init(p, r):
            opt = self.setup.tx.init(to_f32(p) if self.setup.fp32_state else p)
            aux = None
            if seppo:  # slot 0 holds the initial model, the first reference
                aux = {"pool": jax.tree.map(lambda x: jnp.stack([x] * pool), p),
                       "count": jnp.ones((), jnp.int32)}
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, base=None, rest=r,
                              ref=jax.tree.map(jnp.copy, p) if reference else None,
                              opt_state=opt, loss_state=None,
                              rng=jax.random.key_data(jax.random.key(self.seed)), aux=aux)

        self.abstract = jax.eval_shape(init, params, rest)
        self.state_sh = tree_shardings(self.abstract, self.mesh)
        with jax.set_mesh(self.mesh):
            placed = jax.device_put((params, rest), tree_shardings((params, rest), self.mesh))
            self.state = jax.jit(init, out_shardings=self.state_sh)(*placed)
        self._refresh = jax.jit(self._refresh_reference, in_shardings=(self.state_sh, None),
                                out_shardings=self.state_sh, donate_argnums=0) if seppo else None

    def _key(self, number: int, purpose: int):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), purpose), number)

    def model(self, params=None):
        """The policy (or other parameters) as a module, on the run's devices."""
        params = self.state.params if params is None else params
        return nnx.merge(self.setup.graphdef, params, self.state.rest)

    # The batch of one step (global, numpy, on every host).

    def next_batch(self, number: int, peek: bool = False) -> dict:
        """Step `number`'s global batch `[M, N, ...]` (peek: without moving the loader)."""
        position = self.loader.position
        batch = self.loader.next_batch()
        if peek:
            self.loader.position = position
        index = batch.pop("example_index")
        if self.setup.kind == "trajectory":
            batch = self.trajectories(batch, number, peek)
        elif "reference_samples" in self.needs:
            batch["rejected_nhwc"] = self.reference_samples(batch["label_n"], number)
        batch["row_n"] = np.arange(len(batch["pair_valid"]), dtype=np.int32)
        batch["example_index"] = (np.repeat(index, self.config.group_size)
                                  if self.setup.kind == "trajectory" else index)
        return micro(batch, self.micro_batches)

    def trajectories(self, prompts: dict, number: int, peek: bool) -> dict:
        """`group_size` trajectories per prompt from one start noise, sampled from the policy."""
        group, cfg = self.config.group_size, self.setup.sampler
        labels_n = np.repeat(prompts["label_n"], group)
        n, steps = len(labels_n), cfg.num_steps
        shape = self.image_shape
        if peek:  # shapes only: the probe that compiles the step
            traj = dict(xs=np.zeros((n, steps + 1, *shape), np.float32),
                        logps=np.zeros((n, steps), np.float32), reward=np.zeros(n, np.float32))
        else:
            noise_key, sample_key = jax.random.split(self._key(number, 1))
            noise = jax.random.normal(noise_key, (len(prompts["label_n"]), *shape), jnp.float32)
            out = sampling.sample(self.model(), labels_n, sample_key, schedule=self.setup.schedule,
                                  config=cfg, noise_bhwc=jnp.repeat(noise, group, axis=0))
            out = driver.to_host(out)
            images = np.asarray(out.images_bhwc)
            traj = dict(xs=np.moveaxis(np.asarray(out.xs_sbhwc), 0, 1),
                        logps=np.asarray(out.logps_sb).T,
                        reward=np.asarray(self.reward_fn(images, labels_n), np.float32))
        return {"xs_nshwc": traj["xs"], "label_n": labels_n, "reward_n": traj["reward"],
                "old_logps_ns": traj["logps"], "mask_ns": self.step_mask(n, steps, number),
                "prompt_id_n": np.repeat(np.arange(len(prompts["label_n"]), dtype=np.int32),
                                         group),
                "pair_valid": np.ones(n, np.float32)}

    def step_mask(self, n: int, steps: int, number: int) -> np.ndarray:
        """Which steps of each trajectory train (`train_fraction` of them, drawn per row)."""
        keep = max(1, round(self.config.train_fraction * steps))
        rng = np.random.default_rng((self.seed, number, 2))
        mask = np.zeros((n, steps), np.float32)
        for row in range(n):
            mask[row, rng.permutation(steps)[:keep]] = 1.0
        return mask

    def reference_samples(self, labels_n: np.ndarray, number: int) -> np.ndarray:
        """SePPO's losing images: the reference's own samples for the batch's prompts."""
        ref = self.model(self.state.ref)
        out = sampling.sample(ref, labels_n, self._key(number, 3), schedule=self.setup.schedule,
                              config=self.setup.sampler)
        return np.asarray(driver.to_host(out.images_bhwc))

    def _refresh_reference(self, state: TrainState, key) -> TrainState:
        """Snapshot the policy into the pool (oldest out), draw the next reference from it."""
        pool, count = state.aux["pool"], state.aux["count"]
        size = jax.tree.leaves(pool)[0].shape[0]
        pool = jax.tree.map(lambda stack, x: stack.at[count % size].set(x), pool, state.params)
        count = count + 1
        pick = jax.random.randint(key, (), 0, jnp.minimum(count, size))
        ref = jax.tree.map(lambda stack: stack[pick], pool)
        return state.replace(ref=ref, aux={"pool": pool, "count": count})

    # The driver's Task interface.

    def step(self, number: int) -> tuple[dict, np.ndarray]:
        batch = self.next_batch(number)
        index = batch.pop("example_index")
        self.state, metrics = self.step_fn(self.state, local_rows(batch, self.batch_sh))
        if self._refresh is not None and number % self.config.reference_every == 0:
            self.state = self._refresh(self.state, jax.random.key_data(self._key(number, 4)))
        return means(metrics), index

    def data_state(self) -> dict:
        return self.loader.state_dict()

    def restore(self, state, data_state: dict) -> None:
        self.state = state
        self.loader.load_state_dict(data_state)

    def export(self, output_dir: str) -> None:
        """`output_dir/export`: the trained model as a diffusion model directory."""
        params = driver.to_host(self.state.params)
        rest = driver.to_host(self.state.rest)
        if jax.process_index() == 0:
            spec_lib.save(nnx.merge(self.setup.graphdef, params, rest), self.setup.schedule,
                          os.path.join(output_dir, "export"))
        driver.sync("export: diffusion model")

    def report(self, values: dict) -> dict:
        return values


@gin.configurable("train_diffusion")
def train(model_spec, data_spec, algo, optim_config, loop_config, *,
          diffusion: DiffusionConfig = DiffusionConfig()) -> dict:
    """Train a diffusion model from gin specs (the driver: checkpoints, resume, export)."""
    optim_config = optim.for_run(optim_config, loop_config.steps)
    return driver.run_config(lambda: DiffusionTask(model_spec, data_spec, algo, optim_config,
                                                   loop_config, diffusion), loop_config)

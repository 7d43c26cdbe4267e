"""Iterative / online preference optimisation: generate -> score -> train, repeated.

Shape letters: `b` prompts, `n` samples per prompt, `m` micro-batches.

Each iteration samples `samples_per_prompt` replies per prompt from the current policy, scores
them (`evals.rm_scorers`: VADER, a reward model, an ensemble...), builds pairs
(`evals.onpolicy`: best vs worst, all pairs or RSO; SPPO win probabilities as `extra/` fields)
and runs `steps_per_iteration` steps of the engine's jitted step on them. ALGORITHMS.md
section 5:

- reference `previous`: before each iteration the reference becomes the current policy
  (`train.reference.refresh`), so iteration t trains pi_{t+1} against pi_t (online DPO, SPPO,
  DNO); `initial` keeps the starting reference throughout.
- APO: after iteration t the trained policy `thetahat_{t+1}` is extrapolated,
  `theta_{t+1} = thetahat_{t+1} + a (thetahat_{t+1} - thetahat_t)` (a = 0.3; `thetahat_0` is
  the initial policy), exactly, in the merged weights (`apo_extrapolate`). Under LoRA the
  extrapolated delta `(1 + a) s A'B' - a s AB` has rank up to 2r, which adapters cannot hold,
  and extrapolating A and B separately would give `s (A' + a dA)(B' + a dB)`, a different point;
  so the momentum term `a (thetahat_{t+1} - thetahat_t)` is folded into the frozen base weights
  and the adapters keep training from where they stopped. The base then is no longer the
  initial model, so APO under LoRA refuses reference kind `lora` (base as reference).
- Optimiser: each iteration starts from a fresh optimiser state, so the learning-rate schedule
  restarts and spans `OptimConfig.total_steps` (set it to `steps_per_iteration`), as in the
  iterative DPO and SPPO recipes; `reset_optimizer=False` carries moments and schedule over.
  `TrainState.step` counts all steps of the run either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.evals import onpolicy
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.sampling.generate import SamplingConfig
from prefopt_jax.train import build, loop as loop_lib, reference
from prefopt_jax.train.metrics import means
from prefopt_jax.train.state import policy_params, to_f32


@dataclasses.dataclass(frozen=True)
class IterativeConfig:
    """The outer loop.

    Attributes:
      iterations: generate -> score -> train rounds.
      steps_per_iteration: optimiser steps on each round's pairs.
      samples_per_prompt: replies sampled per prompt (k).
      pairs: pair selection (`evals.onpolicy.MODES`); `accept`, `rso_beta` for RSO.
      reference: `previous` (the last iterate) or `initial`.
      momentum: APO's a (0 = plain iterative; the spec's value is 0.3).
      win_probs: add SPPO's win-probability extras; `win_scale` None = hard counts, else
        Bradley-Terry `sigma(scale (r_i - r_j))`.
      batch_size: pairs per step.
      reset_optimizer: a fresh optimiser state (moments and schedule step) at the start of
        every iteration; False carries the last iteration's state over.
    """

    iterations: int = 2
    steps_per_iteration: int = 10
    samples_per_prompt: int = 4
    pairs: str = "best_vs_worst"
    accept: int = 2
    rso_beta: float = 0.5
    reference: str = "previous"
    momentum: float = 0.0
    win_probs: bool = False
    win_scale: float | None = None
    batch_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    stop_ids: tuple = ()
    reset_optimizer: bool = True

    def __post_init__(self):
        if self.reference not in ("previous", "initial"):
            raise ValueError(f"reference must be 'previous' or 'initial', not {self.reference!r}")
        object.__setattr__(self, "stop_ids", tuple(self.stop_ids))


def nesterov(new, prev, a: float):
    """APO's step: `new + a (new - prev)` leafwise, in float32, cast back to `new`'s dtypes."""
    def one(n, p):
        n32 = n.astype(jnp.float32)
        return (n32 + a * (n32 - p.astype(jnp.float32))).astype(n.dtype)

    return jax.tree.map(one, new, prev)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def current_policy(setup, state) -> nnx.Module:
    """The policy of a TrainState as a plain NNX module on the host (LoRA merged).

    Call on every process: parameters sharded over hosts are gathered (`loop.to_host`).
    """
    return nnx.merge(setup.graphdef, loop_lib.to_host(policy_params(setup, state)),
                     loop_lib.to_host(state.rest))


def sample_round(policy, prompts, scorer, config: IterativeConfig, seed: int, pad_id: int):
    """This round's pairs sampled from `policy`: (TokenizedData, mean sample score)."""
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, stop_ids=config.stop_ids)
    scored = onpolicy.sample_and_score(
        policy, prompts, scorer, config.samples_per_prompt, sampling, mode=config.pairs,
        accept=config.accept, rso_beta=config.rso_beta, seed=seed, pad_id=pad_id)
    data = onpolicy.to_tokenized(scored, config.win_scale, config.win_probs)
    return data, float(np.mean(scored.scores_bn))


def next_batch(loader, micro: int) -> dict:
    """A stacked batch; filler pairs' missing extras (nan) become 1/2 so the loss stays finite."""
    batch_m = loop_lib.next_batch_m(loader, micro)
    for key in [k for k in batch_m if k.startswith("extra/")]:
        batch_m[key] = np.nan_to_num(batch_m[key], nan=0.5)
    return batch_m


def probe_setup(setup, batch_m):
    """`setup` whose loss sees the batch's `extra/` fields when probed for its initial state.

    `build.initial_loss_state` calls the loss without the extras that `step.micro_loss`
    attaches, which fails for losses that read them (sppo); only the probe is affected.
    """
    extras = {k[len("extra/"):]: jnp.asarray(v[0]) for k, v in batch_m.items()
              if k.startswith("extra/")}
    if not extras:
        return setup
    fn = setup.loss_fn

    def with_extras(inputs, state=None, **hyper):
        return fn(inputs if inputs.extras else inputs.replace(extras=extras), state, **hyper)

    return dataclasses.replace(setup, loss_fn=with_extras)


def apo_extrapolate(setup, state, prev_hat, a: float):
    """(state at `theta_{t+1}`, `thetahat_{t+1}`): APO's step on the merged policy weights.

    `prev_hat` is `thetahat_t`, full policy Params. Without LoRA the trained params move to
    `nesterov(hat, prev_hat, a)`; under LoRA the base absorbs `a (hat - prev_hat)` (zero on
    kernels without adapters) so that base + s A B is exactly that point.
    """
    hat = _copy(policy_params(setup, state))
    if setup.lora is None:
        return state.replace(params=nesterov(state.params, prev_hat, a)), hat

    def shift(b, h, p):
        b32, h32, p32 = (x.astype(jnp.float32) for x in (b, h, p))
        return (b32 + a * (h32 - p32)).astype(b.dtype)

    return state.replace(base=jax.tree.map(shift, state.base, hat, prev_hat)), hat


def fresh_optimizer(setup, state, mesh):
    """`state` with the optimiser state of a fresh `setup.tx.init`, sharded like the old one."""
    def init(params):
        return setup.tx.init(to_f32(params) if setup.fp32_state else params)

    shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    with jax.set_mesh(mesh):
        return state.replace(opt_state=jax.jit(init, out_shardings=shardings)(state.params))


def next_round(setup, state, config: IterativeConfig, mesh):
    """The state an iteration after the first starts from: reference and optimiser renewed."""
    if config.reference == "previous":
        state = reference.refresh(state, policy_params(setup, state))
    if config.reset_optimizer:
        state = fresh_optimizer(setup, state, mesh)
    return state


def check_run(algo: build.AlgoConfig, config: IterativeConfig, lora) -> None:
    """Refuse reference settings the loop cannot honour."""
    if config.reference == "previous" and algo.reference.kind not in ("frozen", "previous"):
        raise ValueError("a previous-iterate reference is kept in the state: use "
                         f"ReferenceConfig.kind 'previous' (got {algo.reference.kind!r})")
    if config.momentum and lora is not None and algo.reference.kind == "lora":
        raise ValueError("APO momentum under LoRA moves the base weights, which reference kind "
                         "'lora' uses as the reference; use kind 'frozen' or 'previous'")


def run(model, prompts: Sequence[Sequence[int]], scorer: Callable, algo: build.AlgoConfig,
        optim_config, config: IterativeConfig, *, lora=None, mesh=None, seed: int = 0,
        pad_id: int = 0, micro_batches: int = 1, callback: Callable | None = None):
    """The loop; returns (setup, state, history). `callback(t, setup, state)` after each round."""
    check_run(algo, config, lora)
    mesh = mesh or sharding_lib.make_mesh((1, 1, 1))
    graphdef, params, base, rest = build.split_model(model, lora, seed)
    setup = build.make_setup(graphdef, algo, optim_config, lora)
    state = abstract = prev_hat = None
    history = []
    for t in range(config.iterations):
        policy = model if state is None else current_policy(setup, state)
        data, mean_score = sample_round(policy, prompts, scorer, config, seed + t, pad_id)
        loader = data_lib.Loader(data, min(config.batch_size, len(data)),
                                 data_lib.LayoutConfig(kind="padded"), seed=seed + t,
                                 num_epochs=None)
        probe = next_batch(loader, micro_batches)
        loader.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 0})
        if abstract is None:
            state, abstract = build.place_state(probe_setup(setup, probe), params, base, rest,
                                                probe, mesh, seed)
            prev_hat = _copy(policy_params(setup, state)) if config.momentum else None
        else:
            state = next_round(setup, state, config, mesh)
        step_fn, _, batch_sh = build.step_lib.compile_train_step(setup, abstract, probe, mesh)
        with jax.set_mesh(mesh):
            for _ in range(config.steps_per_iteration):
                batch_m = next_batch(loader, micro_batches)
                state, metrics = step_fn(state, loop_lib.to_global(batch_m, batch_sh))
        values = means(metrics)
        if config.momentum:
            state, prev_hat = apo_extrapolate(setup, state, prev_hat, config.momentum)
        history.append(dict(values, iteration=t, pairs=len(data), sample_score=mean_score))
        if callback is not None:
            callback(t, setup, state)
    return setup, state, history


def load_prompts(data_spec, tokenizer, seed: int) -> list:
    """Prompt token ids: the prompts of the data source, or random ones for `tiny`."""
    if data_spec.source == "tiny":
        from prefopt_jax.train import tiny
        return [p for p, _, _ in tiny.pairs(data_spec.tiny_examples, seed)]
    rows = onpolicy.read_prompts(data_spec.source)
    return [onpolicy.prompt_ids(tokenizer, p) for p in rows]


@gin.configurable("train_iterative")
def train(model_spec, data_spec, algo, optim_config, loop_config, *,
          iterative: IterativeConfig = IterativeConfig(), scorer: str = "sentiment",
          aggregate: str = "mean") -> dict:
    """Gin entry (`train.trainer = @train_iterative`): prompts from `DataSpec.source`."""
    from prefopt_jax.evals import rm_scorers

    model, tokenizer = loop_lib.load_model(model_spec)
    prompts = load_prompts(data_spec, tokenizer, loop_config.seed)
    if tokenizer is None and scorer == "sentiment":
        # The tiny model (`train.tiny`) has no tokenizer to decode replies for VADER.
        print("no tokenizer: scoring replies by mean token id instead of sentiment", flush=True)
        scorer = "mean_token"
    score_fn = rm_scorers.from_spec(scorer, tokenizer, aggregate)
    stops = iterative.stop_ids or (() if tokenizer is None else (int(tokenizer.eos_token_id),))
    iterative = dataclasses.replace(iterative, stop_ids=stops)
    pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    setup, state, history = run(
        model, prompts, score_fn, algo, optim_config, iterative, lora=model_spec.lora,
        mesh=sharding_lib.make_mesh(loop_config.mesh_shape), seed=loop_config.seed,
        pad_id=pad_id, micro_batches=data_spec.micro_batches)
    if jax.process_index() == 0:
        os.makedirs(loop_config.output_dir, exist_ok=True)
        with open(os.path.join(loop_config.output_dir, "iterations.jsonl"), "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        for h in history:
            print(f"iteration {h['iteration']}: pairs {h['pairs']} sample score "
                  f"{h['sample_score']:.4f} loss {h.get('loss', float('nan')):.4f}", flush=True)
    return history[-1]

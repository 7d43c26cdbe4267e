"""Iterative / online preference optimisation: generate -> score -> train, round after round.

Shape letters: `b` prompts, `n` samples per prompt, `m` micro-batches.

A task of the shared driver (`train.driver`): `LoopConfig.steps` optimiser steps in rounds of
`IterativeConfig.steps_per_iteration`. Each round samples `samples_per_prompt` replies per
prompt from the current policy, scores them (`rewards.scorers`: VADER, a reward model, an
ensemble...), builds pairs (`sampling.onpolicy`: best vs worst, all pairs or RSO; SPPO win
probabilities as `win_prob_chosen` / `win_prob_rejected`) and trains on them with the engine's
jitted step. Every step's metrics are logged with the round's number, pair count and mean
sample score; checkpoints carry the round and its loader position, and each round's pairs are
kept in `output_dir/rounds/`, so a run killed mid-round resumes exactly. The final policy is
exported like any run's.

- reference `previous`: before each round after the first the reference becomes the current
  policy (`train.reference.refresh`), so round t trains pi_{t+1} against pi_t (online DPO, SPPO,
  DNO); `initial` keeps the starting reference throughout.
- APO: after round t the trained policy `thetahat_{t+1}` is extrapolated,
  `theta_{t+1} = thetahat_{t+1} + a (thetahat_{t+1} - thetahat_t)` (a = 0.3; `thetahat_0` is
  the initial policy), exactly, in the merged weights (`apo_extrapolate`); `thetahat_t` is kept
  in `TrainState.aux`. Under LoRA the extrapolated delta `(1 + a) s A'B' - a s AB` has rank up to
  2r, which adapters cannot hold, and extrapolating A and B separately would give
  `s (A' + a dA)(B' + a dB)`, a different point; so the momentum term
  `a (thetahat_{t+1} - thetahat_t)` is folded into the frozen base weights and the adapters keep
  training from where they stopped. The base then is no longer the initial model, so APO under
  LoRA refuses reference kind `lora` (base as reference).
- Optimiser: each round starts from a fresh optimiser state, so the learning-rate schedule
  restarts and spans `OptimConfig.total_steps` (unset: `steps_per_iteration`), as in the
  iterative DPO and SPPO recipes; `reset_optimizer=False` carries moments and schedule over.
  `TrainState.step` counts all steps of the run either way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.data.tokenized import TokenizedData
from prefopt_jax.losses import ObjectiveError
from prefopt_jax.rewards import scorers as rm_scorers
from prefopt_jax.sampling import onpolicy
from prefopt_jax.sampling.generate import SamplingConfig
from prefopt_jax.train import driver, loop as loop_lib, reference, tiny
from prefopt_jax.train.state import policy_params, to_f32, tree_shardings


@dataclasses.dataclass(frozen=True)
class IterativeConfig:
    """The rounds (their number is `LoopConfig.steps / steps_per_iteration`).

    Attributes:
      steps_per_iteration: optimiser steps on each round's pairs.
      samples_per_prompt: replies sampled per prompt (k).
      pairs: pair selection (`sampling.onpolicy.MODES`); `accept`, `rso_beta` for RSO.
      reference: `previous` (the last iterate) or `initial`.
      momentum: APO's a (0 = plain iterative; the spec's value is 0.3).
      win_probs: add SPPO's win probabilities; `win_scale` None = hard counts, else
        Bradley-Terry `sigma(scale (r_i - r_j))`.
      batch_size: pairs per step (rounds with fewer pairs fill the rest with filler).
      reset_optimizer: a fresh optimiser state (moments and schedule step) at the start of
        every round; False carries the last round's state over.
    """

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


def current_policy(setup, state) -> nnx.Module:
    """The policy of a TrainState as a plain NNX module on the host (LoRA merged).

    Call on every process: parameters sharded over hosts are gathered (`driver.to_host`).
    """
    return nnx.merge(setup.graphdef, driver.to_host(policy_params(setup, state)),
                     driver.to_host(state.rest))


def sample_round(policy, prompts, scorer, config: IterativeConfig, seed: int, pad_id: int):
    """This round's pairs sampled from `policy`: (TokenizedData, mean sample score)."""
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, stop_ids=config.stop_ids)
    scored = onpolicy.sample_and_score(
        policy, prompts, scorer, config.samples_per_prompt, sampling, mode=config.pairs,
        accept=config.accept, rso_beta=config.rso_beta, seed=seed, pad_id=pad_id)
    data = onpolicy.to_tokenized(scored, config.win_scale, config.win_probs)
    return data, float(np.mean(scored.scores_bn))


def apo_extrapolate(setup, state, a: float):
    """The state at `theta_{t+1}`, `aux` = `thetahat_{t+1}`: APO's step on the merged weights.

    `state.aux` holds `thetahat_t`, full policy Params. Without LoRA the trained params move to
    `nesterov(hat, prev_hat, a)`; under LoRA the base absorbs `a (hat - prev_hat)` (zero on
    kernels without adapters) so that base + s A B is exactly that point.
    """
    hat, prev_hat = policy_params(setup, state), state.aux
    if setup.lora is None:
        return state.replace(params=nesterov(state.params, prev_hat, a), aux=hat)

    def shift(b, h, p):
        b32, h32, p32 = (x.astype(jnp.float32) for x in (b, h, p))
        return (b32 + a * (h32 - p32)).astype(b.dtype)

    return state.replace(base=jax.tree.map(shift, state.base, hat, prev_hat), aux=hat)


def fresh_optimizer(setup, state):
    """`state` with the optimiser state of a fresh `setup.tx.init`, sharded like the old one."""
    def init(params):
        return setup.tx.init(to_f32(params) if setup.fp32_state else params)

    shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    return state.replace(opt_state=jax.jit(init, out_shardings=shardings)(state.params))


def next_round(setup, state, config: IterativeConfig):
    """The state a round after the first starts from: reference and optimiser renewed."""
    if config.reference == "previous":
        state = reference.refresh(state, policy_params(setup, state))
    if config.reset_optimizer:
        state = fresh_optimizer(setup, state)
    return state


def check_run(algo, config: IterativeConfig, lora) -> None:
    """Refuse settings the loop cannot honour."""
    if config.reference == "previous" and algo.reference.kind == "auto":
        algo = dataclasses.replace(algo, reference=dataclasses.replace(algo.reference,
                                                                       kind="previous"))
    algo = algo.resolved(lora)
    if config.reference == "previous" and algo.reference.kind not in ("frozen", "previous"):
        raise ValueError("a previous-iterate reference is kept in the state: use "
                         f"ReferenceConfig.kind 'previous' (got {algo.reference.kind!r})")
    if config.momentum and lora is not None and algo.reference.kind == "lora":
        raise ValueError("APO momentum under LoRA moves the base weights, which reference kind "
                         "'lora' uses as the reference; use kind 'frozen' or 'previous'")
    needs = algo.objective().info.needs
    if "win_probs" in needs and not config.win_probs:
        raise ObjectiveError(f"objective {algo.name!r} needs win probabilities: set "
                             "IterativeConfig.win_probs = True")
    unsupported = sorted(set(needs) - {"win_probs", "mismatched", "token_stats",
                                       "token_rewards", "teacher_logits"})
    if unsupported:
        raise ObjectiveError(f"objective {algo.name!r} needs {unsupported[0]}, which the "
                             "iterative loop's sampled pairs do not carry")


def load_prompts(data_spec, tokenizer, seed: int) -> list:
    """Prompt token ids: the prompts of the data source, or random ones for `tiny`."""
    if data_spec.source == "tiny":
        return [p for p, _, _ in tiny.pairs(data_spec.tiny_examples, seed)]
    rows = onpolicy.read_prompts(data_spec.source)
    return [onpolicy.prompt_ids(tokenizer, p) for p in rows]


class IterativeTask(loop_lib.PolicyTask):
    """The policy trained round by round on pairs sampled from itself (`driver.Task`).

    `scorer`: a callable `scorer(candidates) -> scores_bn` or a spec for `rewards.scorers
    .from_spec` (sentiment, rm:DIR, ...); `prompts`: token-id lists (None: the prompts of
    `DataSpec.source`). `callback(t, setup, state)` runs after each round's last step.
    """

    def __init__(self, model_spec, data_spec, algo, optim_config, loop, *,
                 iterative: IterativeConfig = IterativeConfig(), scorer="sentiment",
                 aggregate: str = "mean", prompts=None, callback: Callable | None = None):
        check_run(algo, iterative, model_spec.lora)
        self.config, self.scorer_spec, self.aggregate = iterative, scorer, aggregate
        self.prompts, self.callback, self.round, self.round_info = prompts, callback, 0, {}
        super().__init__(model_spec, data_spec, algo, optim_config, loop)

    def check_sources(self, model_spec, data_spec) -> None:
        """Prompts may come from any file with a `prompt` column: only its existence is checked
        before the model loads."""
        loop_lib.check_sources(model_spec, data_spec, rows=False)

    def schedule_steps(self) -> tuple[int, str]:
        if self.config.reset_optimizer:  # each round restarts the schedule
            return self.config.steps_per_iteration, "IterativeConfig.steps_per_iteration"
        return super().schedule_steps()

    def first_loader(self, model, vocab_size: int) -> data_lib.Loader:
        """Round 0's pairs: saved by an earlier start of this run, or sampled from `model`."""
        tokenizer = self.tokenizer
        if self.prompts is None:
            self.prompts = load_prompts(self.data_spec, tokenizer, self.loop.seed)
        scorer = self.scorer_spec
        if not callable(scorer):
            if tokenizer is None and scorer == "sentiment":
                # The tiny model has no tokenizer to decode replies for VADER.
                print("no tokenizer: scoring replies by mean token id instead of sentiment",
                      flush=True)
                scorer = "mean_token"
            scorer = rm_scorers.from_spec(scorer, tokenizer, self.aggregate)
        self.scorer = scorer
        stops = self.config.stop_ids or (() if tokenizer is None else
                                         (int(tokenizer.eos_token_id),))
        self.config = dataclasses.replace(self.config, stop_ids=stops)
        self.pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else \
            tokenizer.pad_token_id
        return self.round_loader(0, model)

    def round_path(self, t: int) -> str:
        return os.path.join(self.loop.output_dir, "rounds", f"round_{t:04d}.npz")

    def round_loader(self, t: int, policy=None) -> data_lib.Loader:
        """Round t's loader: its pairs from `rounds/` when kept, else sampled from `policy`."""
        path = self.round_path(t)
        if os.path.exists(path):
            data = TokenizedData.load(path)
            with np.load(path) as z:
                score = float(z["sample_score"])
        else:
            if policy is None:
                raise FileNotFoundError(f"{path}: the pairs of round {t}, which the checkpoint "
                                        "resumes, are missing")
            data, score = sample_round(policy, self.prompts, self.scorer, self.config,
                                       self.loop.seed + t, self.pad_id)
            if jax.process_index() == 0:
                data.save(path, extra={"sample_score": np.float32(score)})
            driver.sync("round " + path)
        self.round_info = {"round": t, "pairs": len(data), "sample_score": score}
        lo, hi = data_lib.shard_range(len(data), jax.process_index(), jax.process_count())
        local = data.select(np.arange(lo, hi)) if jax.process_count() > 1 else data
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        layout = data_lib.LayoutConfig(kind=self.data_spec.layout, row_multiple=shards)
        return data_lib.Loader(local, self.config.batch_size // jax.process_count(), layout,
                               seed=self.loop.seed + t, num_epochs=None)

    def with_aux(self, abstract):
        """APO keeps the previous iterate `thetahat_t` (full policy Params) in `aux`."""
        if not self.config.momentum:
            return abstract
        return abstract.replace(aux=jax.eval_shape(lambda s: policy_params(self.setup, s),
                                                   abstract))

    def place_aux(self, state):
        if not self.config.momentum:
            return state
        aux_sh = tree_shardings(self.abstract.aux, self.mesh)
        with jax.set_mesh(self.mesh):
            # A copy: the state is donated to each step, and one buffer cannot be donated twice.
            hat = jax.jit(lambda s: jax.tree.map(jnp.copy, policy_params(self.setup, s)),
                          out_shardings=aux_sh)(state)
        return state.replace(aux=hat)

    def step(self, number: int):
        t = (number - 1) // self.config.steps_per_iteration
        if t != self.round:
            self.state = next_round(self.setup, self.state, self.config)
            self.loader = self.round_loader(t, current_policy(self.setup, self.state))
            self.round = t
        values, example_index = super().step(number)
        if number % self.config.steps_per_iteration == 0:
            if self.config.momentum:
                self.state = apo_extrapolate(self.setup, self.state, self.config.momentum)
            if self.callback is not None:
                self.callback(t, self.setup, self.state)
        return dict(values, **self.round_info), example_index

    def data_state(self) -> dict:
        return {"round": self.round, "loader": self.loader.state_dict()}

    def restore(self, state, data_state: dict) -> None:
        self.state = state
        if data_state["round"] != self.round:
            self.round = data_state["round"]
            self.loader = self.round_loader(self.round)
        self.loader.load_state_dict(data_state["loader"])

    def report(self, values: dict) -> dict:
        """`iterations.jsonl`: each round's last step (from the run's metrics)."""
        if jax.process_index() != 0:
            return values
        with open(os.path.join(self.loop.output_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        last = {r["round"]: r for r in records}
        with open(os.path.join(self.loop.output_dir, "iterations.jsonl"), "w") as f:
            f.writelines(json.dumps(last[t], sort_keys=True) + "\n" for t in sorted(last))
        for t in sorted(last):
            r = last[t]
            print(f"iteration {t}: pairs {r['pairs']} sample score {r['sample_score']:.4f} "
                  f"loss {r.get('loss', float('nan')):.4f}", flush=True)
        return values


@gin.configurable("train_iterative")
def train(model_spec, data_spec, algo, optim_config, loop_config, *,
          iterative: IterativeConfig = IterativeConfig(), scorer: str = "sentiment",
          aggregate: str = "mean") -> dict:
    """Gin entry (`train.trainer = @train_iterative`): prompts from `DataSpec.source`."""
    task = functools.partial(IterativeTask, iterative=iterative, scorer=scorer,
                             aggregate=aggregate)
    return loop_lib.train(model_spec, data_spec, algo, optim_config, loop_config, task)

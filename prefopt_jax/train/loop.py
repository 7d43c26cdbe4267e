"""The policy loop: `prefopt train`'s default task, a policy trained on a preference data source.

Shape letters: `m` micro-batches, `r` rows, `l` row length, `q` sequences, `c` completion
positions.

`PolicyTask` builds everything from frozen specs (model, teachers, objective, data of the kind
the objective reads, reference cache, margins, sharded state, compiled step) and says what one
step is; the driver (`train.driver.run`) steps, logs, checkpoints, resumes and exports. A run is
a pure function of its specs and the data.
"""

from __future__ import annotations

import dataclasses
import json
import os

import gin
import jax
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.data import synthetic
from prefopt_jax.data.tokenized import as_kind
from prefopt_jax.losses import ObjectiveError
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.spec import ModelSpec, check_source, load_model
from prefopt_jax.train import build, driver, margins, optim, refcache, reference
from prefopt_jax.train import step as step_lib
from prefopt_jax.train.state import policy_params

__all__ = ["DataSpec", "LoopConfig", "ModelSpec", "PolicyTask", "load_model", "train"]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Which data and how it is batched; `source="tiny"` is synthetic data for the tiny model
    (of the kind the objective reads: paired, triple, unpaired or listwise).

    `row_length` and `length_step` are the layout's (`data.LayoutConfig`): the packed row
    length (None: the bucket of the longest example), and finer per-batch row lengths (multiples
    of it; less padding, more compiled shapes).

    `flip_rate` and `relabel_with_scores` are the data transforms of the studies
    (`data.transforms`): swap chosen and rejected in a seeded `flip_rate` share of the examples
    (label noise), and turn each scored pair into two score-conditioned pairs (reward-augmented
    DPO; the file needs `score_chosen` and `score_rejected`). Text sources only.
    """

    source: str = "tiny"
    layout: str = "padded"
    batch_size: int = 8
    micro_batches: int = 1
    max_length: int | None = 512
    tiny_examples: int = 64
    shuffle: bool = True
    row_length: int | None = None
    length_step: int | None = None
    flip_rate: float = 0.0
    relabel_with_scores: bool = False

    def __post_init__(self):
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ValueError(f"DataSpec.flip_rate must be in [0, 1], got {self.flip_rate}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Steps, seeds, outputs and checkpoints (`checkpoint_every=0`: only on SIGTERM).

    A run started again in its `output_dir` resumes from the newest intact checkpoint; a
    finished one says so and leaves its outputs alone unless `overwrite`, which trains it again
    from step 0.
    """

    steps: int = 10
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    logps_chunk: int = 512
    export: bool = True
    overwrite: bool = False
    mesh_shape: tuple = (1, 1, 1)
    # Iterative methods: the reference becomes the policy every this many steps (0 = never).
    refresh_reference_every: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))


# The data each inputs type reads (a triple's gold completion when the objective needs it).
DATA_KINDS = {"pairwise": "paired", "unpaired": "unpaired", "listwise": "listwise",
              "distill": "paired", "reward": "paired"}


def data_kind(objective) -> str:
    """The kind of examples the objective reads."""
    return "triple" if "gold" in objective.info.needs else DATA_KINDS[objective.info.inputs]


def make_loader(spec: DataSpec, tokenizer, seed: int, vocab_size: int, row_multiple: int = 1,
                kind: str = "paired", win_probs: bool = False) -> data_lib.Loader:
    """This host's loader of examples of `kind` (multi-host: its own slice of the examples)."""
    layout = data_lib.LayoutConfig(kind=spec.layout, row_multiple=row_multiple,
                                   row_length=spec.row_length, length_step=spec.length_step)
    pi, pc = jax.process_index(), jax.process_count()
    if spec.source == "tiny":
        if spec.flip_rate or spec.relabel_with_scores:
            raise ValueError("DataSpec.flip_rate and DataSpec.relabel_with_scores transform text "
                             "records; DataSpec.source='tiny' has none (use a preference file)")
        full = synthetic.tiny_data(kind, spec.tiny_examples, seed, vocab_size, win_probs)
        lo, hi = data_lib.shard_range(len(full), pi, pc)
        data = full.select(np.arange(lo, hi)) if pc > 1 else full
    else:
        if tokenizer is None:
            raise ValueError(f"DataSpec.source={spec.source!r} needs a tokenizer and the model "
                             "has none (a random:NAME architecture, or a model directory without "
                             "tokenizer files); use DataSpec.source='tiny' (synthetic tokens) or "
                             "a model that ships its tokenizer")
        config = data_lib.DataConfig(max_length=spec.max_length, seed=seed,
                                     ranked="listwise" if kind == "listwise" else "best_vs_worst",
                                     flip_rate=spec.flip_rate,
                                     relabel_with_scores=spec.relabel_with_scores)
        data, report = data_lib.prepare(data_lib.open_source(spec.source), tokenizer, config,
                                        pi, pc)
        print(report.summary(), flush=True)
        data = as_kind(data, kind, spec.source)
    if win_probs and not {"win_prob_chosen", "win_prob_rejected"} <= set(data.fields):
        raise ObjectiveError(f"the objective needs win probabilities of chosen and rejected; "
                             f"{spec.source} has no win_prob_chosen / win_prob_rejected columns "
                             "(the iterative loop supplies them: train.trainer = "
                             "@train_iterative with IterativeConfig.win_probs = True)")
    return data_lib.Loader(data, spec.batch_size // pc, layout, seed=seed, shuffle=spec.shuffle,
                           num_epochs=None)


def check_sources(model_spec: ModelSpec, data_spec: DataSpec, rows: bool = True) -> None:
    """The model and the data exist (and with `rows`, the data's first rows are valid
    preference rows): checked before any model loads, so a typo in a path fails in a second,
    not after the model has loaded."""
    check_source(model_spec)
    if data_spec.source == "tiny":
        return
    if rows:
        data_lib.check_source(data_spec.source)
    else:
        data_lib.open_source(data_spec.source)


def provenance(task) -> dict[str, str]:
    """Files an export carries about its run: the operative gin config (when the run came from
    gin) and `prefopt_run.json` naming the base model, the objective and the steps."""
    record = {"base_model": task.model_spec.source, "lora": task.model_spec.lora is not None,
              "objective": task.setup.objective.name, "steps": task.loop.steps,
              "output_dir": os.path.abspath(task.loop.output_dir)}
    files = {"prefopt_run.json": json.dumps(record, indent=1, sort_keys=True) + "\n"}
    operative = gin.operative_config_str()
    if operative.strip():
        files["operative_config.gin"] = operative
    return files


def export(task, directory: str) -> str:
    """The policy (LoRA merged) in Hugging Face format, written by process 0.

    Call on every process: parameters sharded over hosts are gathered first, and all processes
    leave together once the export is complete.
    """
    from prefopt_jax.models import save_pretrained
    state = task.state.replace(params=driver.to_host(task.state.params),
                               base=driver.to_host(task.state.base))
    model = nnx.merge(task.setup.graphdef, policy_params(task.setup, state),
                      driver.to_host(task.state.rest))
    if jax.process_index() == 0:
        save_pretrained(model, directory, task.tokenizer, extra_files=provenance(task))
    driver.sync("export: " + directory)
    return str(directory)


class PolicyTask(driver.LoaderTask):
    """A policy trained on preference batches (`driver.Task`).

    Subclasses change where the data comes from (`first_loader`) and what happens between
    steps (`step`), e.g. the iterative loop's rounds; `online` ones train rollout objectives
    on their own samples.
    """

    online = False

    def __init__(self, model_spec: ModelSpec, data_spec: DataSpec, algo: build.AlgoConfig,
                 optim_config: optim.OptimConfig, loop: LoopConfig):
        algo = algo.resolved(model_spec.lora)
        self.model_spec, self.data_spec, self.loop, self.algo = model_spec, data_spec, loop, algo
        optim_config = optim.for_run(optim_config, *self.schedule_steps())
        self.micro_batches = data_spec.micro_batches
        # Before loading any model:
        build.check_needs(algo.objective(), algo, model_spec.lora, self.online)
        self.check_sources(model_spec, data_spec)
        model, self.tokenizer = load_model(model_spec)
        self.mesh = sharding_lib.make_mesh(loop.mesh_shape)
        graphdef, params, base, rest = build.split_model(model, model_spec.lora, loop.seed)
        teachers, teacher_graphdef = build.load_teachers(algo, model_spec,
                                                         model.config.vocab_size)
        critic_setup, critic = build.load_critic(algo, model_spec, model.config, optim_config)
        self.setup = build.make_setup(graphdef, algo, optim_config, model_spec.lora,
                                      loop.logps_chunk, teacher_graphdef, self.online,
                                      critic_setup)
        build.check_accumulation(self.setup.objective, data_spec.micro_batches)
        self.loader = self.first_loader(model, model.config.vocab_size)
        initial = params if base is None else base
        self.fillers = self.data_fillers(graphdef, initial, rest, teachers, teacher_graphdef)
        probe = driver.next_batch_m(self.loader, data_spec.micro_batches, self.fillers)
        self.loader.load_state_dict({**self.loader.state_dict(), "epoch": 0, "step": 0})
        in_step = {"token_rewards", "teacher_logits"} & set(self.setup.needs)
        # The state takes over the loaded weights (donated): they are never held twice.
        self.state, abstract = build.place_state(self.setup, params, base, rest, probe,
                                                 self.mesh, loop.seed, donate=True,
                                                 frozen=teachers if in_step else None,
                                                 critic=critic)
        self.abstract = self.with_aux(abstract)
        self.state = self.place_aux(self.state)
        self.step_fn, self.state_sh, self.batch_sh = step_lib.compile_train_step(
            self.setup, self.abstract, probe, self.mesh)

    def check_sources(self, model_spec: ModelSpec, data_spec: DataSpec) -> None:
        """Before any model loads: the model and preference data exist, first rows valid."""
        check_sources(model_spec, data_spec)

    def schedule_steps(self) -> tuple[int, str]:
        """The optimiser steps one learning-rate schedule spans, and the setting that says so."""
        return self.loop.steps, "LoopConfig.steps"

    def first_loader(self, model, vocab_size: int) -> data_lib.Loader:
        """The loader of the run's data (`DataSpec`), examples of the kind the objective reads."""
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return make_loader(self.data_spec, self.tokenizer, self.loop.seed, vocab_size, shards,
                           data_kind(self.setup.objective), "win_probs" in self.setup.needs)

    def data_fillers(self, graphdef, initial, rest, teachers, teacher_graphdef) -> list:
        """Per-example data computed before training and added to each batch: the precomputed
        reference's log-probs, other reward models' margins (both cached on disk)."""
        fillers, loader, loop = [], self.loader, self.loop
        ref = self.algo.reference
        if ref.kind == "precomputed":
            fillers.append(refcache.load_or_compute(
                ref.cache_dir, loader.data, loader.layout, loader.batch_size, graphdef, initial,
                rest, loop.logps_chunk).fill)
        if "margins" in self.setup.needs:
            def model(name):
                entry = (teachers or {}).get(name)
                return entry and (teacher_graphdef, entry["params"], entry["rest"])

            table = margins.load_or_compute(
                self.algo.margins, ref.cache_dir, loader.data, loader.layout, loader.batch_size,
                teacher=model("teacher"), reference=model("teacher_ref") or (graphdef, initial,
                                                                             rest),
                beta=self.setup.teacher_beta, chunk_size=loop.logps_chunk)
            fillers.append(table.fill)
        return fillers

    def with_aux(self, abstract):
        """The abstract state with the task's own arrays (`TrainState.aux`); none here."""
        return abstract

    def place_aux(self, state):
        """The placed state with the task's own arrays; none here."""
        return state

    def step(self, number: int) -> tuple[dict, np.ndarray]:
        """One optimiser step; the reference becomes the policy when a refresh is due."""
        values, example_index = super().step(number)
        every = self.loop.refresh_reference_every
        if every and number % every == 0:
            self.state = reference.refresh(self.state, policy_params(self.setup, self.state))
        return values, example_index

    def export(self, output_dir: str) -> None:
        export(self, os.path.join(output_dir, "export"))


def train(model_spec: ModelSpec, data_spec: DataSpec, algo: build.AlgoConfig,
          optim_config: optim.OptimConfig, loop: LoopConfig, task_class=PolicyTask) -> dict:
    """Train (or resume) to `loop.steps`; returns the last step's metric means."""
    return driver.run_config(
        lambda: task_class(model_spec, data_spec, algo, optim_config, loop), loop)

"""The training loop: build everything from frozen specs, step, log, checkpoint, resume, export.

Shape letters: `m` micro-batches, `r` rows, `l` row length, `q` sequences, `c` completion
positions.

A run is a pure function of its specs and the data: restarting the same command resumes from
the newest complete checkpoint (state, optimiser, step, RNG, loss state and data position) and
produces exactly the metrics an uninterrupted run produces.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import presets
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.train import build, optim, refcache, reference, tiny
from prefopt_jax.train.checkpoint import Checkpointer
from prefopt_jax.train.metrics import MetricsWriter, means
from prefopt_jax.train.state import policy_params


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model: `tiny` (random, for smoke runs), `random:NAME` (a released architecture with
    random weights, `models.presets`), a built-in name, a HF directory or .gguf.

    `overrides` are ModelConfig fields (e.g. remat_policy, scan_layers) as (name, value) pairs.
    """

    source: str = "tiny"
    dtype: str = "float32"
    param_dtype: str | None = None
    overrides: tuple = ()
    lora: lora_lib.LoraConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "overrides", tuple(sorted(dict(self.overrides).items())))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Which data and how it is batched; `source="tiny"` is synthetic data for the tiny model.

    `row_length` and `length_step` are the layout's (`data.LayoutConfig`): the packed row
    length (None: the bucket of the longest example), and finer per-batch row lengths (multiples
    of it; less padding, more compiled shapes).
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


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Steps, seeds, outputs and checkpoints (`checkpoint_every=0`: only on SIGTERM)."""

    steps: int = 10
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    logps_chunk: int = 512
    export: bool = True
    mesh_shape: tuple = (1, 1, 1)
    # Iterative methods: the reference becomes the policy every this many steps (0 = never).
    refresh_reference_every: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))


def load_model(spec: ModelSpec):
    """(model, tokenizer): the tiny random model, or weights from disk (never downloaded)."""
    overrides = dict(spec.overrides)
    dtype = jnp.dtype(spec.dtype)
    if spec.param_dtype:
        overrides["param_dtype"] = jnp.dtype(spec.param_dtype)
    if spec.source == "tiny":
        config = tiny.config(dtype=dtype, param_dtype=overrides.pop("param_dtype", dtype),
                             **overrides)
        return tiny_model(config), None
    if presets.is_random(spec.source):
        config = presets.config(spec.source, dtype=dtype,
                                param_dtype=overrides.pop("param_dtype", dtype), **overrides)
        return tiny_model(config), None
    from prefopt_jax.models import from_pretrained
    return from_pretrained(spec.source, dtype=dtype, **overrides)


def tiny_model(config):
    """A model of `config` with random weights (seed 0): the tiny one, or a random:NAME one."""
    from prefopt_jax.models import Transformer
    return Transformer(config, rngs=nnx.Rngs(0))


def tiny_data(n: int, seed: int, vocab_size: int, unpaired: bool):
    """Synthetic tokenised examples; unpaired splits each pair into a desirable and an undesirable."""
    from prefopt_jax.data.synthetic import synthetic_tokenized
    from prefopt_jax.data.tokenized import from_lists
    full = synthetic_tokenized(n, seed=seed, prompt_median=6, completion_median=8, max_length=48,
                               vocab_size=vocab_size)
    if not unpaired:
        return full
    prompts = [full.prompt(i // 2) for i in range(2 * n)]
    completions = [full.completion(i // 2, i % 2) for i in range(2 * n)]
    label = (np.arange(2 * n) % 2 == 0).astype(np.float32)
    return from_lists("unpaired", 1, prompts, completions, np.arange(2 * n), {"label": label})


def make_loader(spec: DataSpec, tokenizer, seed: int, vocab_size: int,
                row_multiple: int = 1, unpaired: bool = False) -> data_lib.Loader:
    """This host's loader (multi-host: its own slice of the examples)."""
    layout = data_lib.LayoutConfig(kind=spec.layout, row_multiple=row_multiple,
                                   row_length=spec.row_length, length_step=spec.length_step)
    pi, pc = jax.process_index(), jax.process_count()
    per_host = spec.batch_size // pc
    if spec.source == "tiny":
        full = tiny_data(spec.tiny_examples, seed, vocab_size, unpaired)
        lo, hi = data_lib.shard_range(len(full), pi, pc)
        local = full.select(np.arange(lo, hi)) if pc > 1 else full
        return data_lib.Loader(local, per_host, layout, seed=seed, shuffle=spec.shuffle,
                               num_epochs=None)
    if tokenizer is None:
        raise ValueError(f"DataSpec.source={spec.source!r} needs a tokenizer and the model has "
                         "none (a random:NAME architecture, or a model directory without "
                         "tokenizer files); use DataSpec.source='tiny' (synthetic tokens) or a "
                         "model that ships its tokenizer")
    config = data_lib.DataConfig(max_length=spec.max_length, seed=seed)
    prepared, report = data_lib.prepare(data_lib.open_source(spec.source), tokenizer, config,
                                        pi, pc)
    print(report.summary(), flush=True)
    return data_lib.Loader(prepared, per_host, layout, seed=seed, shuffle=spec.shuffle,
                           num_epochs=None)


def agreed_shape(loader: data_lib.Loader, count: int) -> data_lib.Shape:
    """The elementwise max shape of the next `count` batches over all hosts (static shapes)."""
    shapes = [loader.peek_shape(ahead) for ahead in range(count)]
    shape_3 = np.max(np.asarray(shapes, np.int64), axis=0)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        shape_3 = np.max(multihost_utils.process_allgather(shape_3), axis=0)
    return data_lib.Shape(*(int(x) for x in shape_3))


def next_batch_m(loader: data_lib.Loader, micro: int, ref_cache=None) -> dict:
    """`micro` loader batches of one agreed shape, stacked on a leading axis (numpy).

    With a precomputed reference, each batch carries its cached `ref_logps`.
    """
    shape = agreed_shape(loader, micro)
    batches = [loader.next_batch(min_shape=shape) for _ in range(micro)]
    if ref_cache is not None:
        batches = [ref_cache.fill(b) for b in batches]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def to_global(batch_m: dict, shardings: dict) -> dict:
    """Global arrays from each host's local slice (identity on one process).

    `source_index` is a flat row index `r * L + t` into this host's rows; in the global batch
    this host's rows come after those of the hosts before it (all hosts have the same shape).
    """
    _, rows, length = batch_m["tokens"].shape
    offset = jax.process_index() * rows * length
    local = dict(batch_m, source_index=batch_m["source_index"] + offset) if offset else batch_m
    return {k: jax.make_array_from_process_local_data(shardings[k], v)
            for k, v in local.items()}


class Stop:
    """Set by SIGTERM: checkpoint after the current step and leave.

    On several hosts the signal may reach only some of them; `agreed()` ORs the flag over every
    process after each step, so all of them save the same step and leave together instead of
    the rest waiting forever in the next step's collectives. Only the handler writes
    `signalled`, so a signal landing while the flags are exchanged is kept for the next step.
    """

    def __init__(self):
        self.signalled = False  # this process got SIGTERM
        self.requested = False  # some process did (set by agreed())
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    def agreed(self) -> bool:
        """Whether any process has been asked to stop (a collective when there are several)."""
        if jax.process_count() == 1:
            stop = self.signalled
        else:
            from jax.experimental import multihost_utils
            stop = bool(np.any(multihost_utils.process_allgather(
                np.asarray(self.signalled, np.int32))))
        self.requested = self.requested or stop
        return self.requested


def check_finite(step: int, values: dict, batch_m: dict, last_good: int | None) -> None:
    """A non-finite loss stops the run, naming the step, the examples and the last checkpoint."""
    if np.isfinite(values.get("loss", 0.0)):
        return
    idx = np.asarray(batch_m["example_index"]).reshape(-1)
    idx = sorted(int(i) for i in idx if i >= 0)
    raise FloatingPointError(
        f"non-finite loss {values.get('loss')} at step {step}; batch examples {idx}; "
        f"last good checkpoint: {last_good if last_good is not None else 'none'}")


@dataclasses.dataclass
class Run:
    """Everything a run holds between steps (host side)."""

    setup: Any
    state: Any
    step_fn: Any
    batch_sh: dict
    abstract: Any
    state_sh: Any
    loader: data_lib.Loader
    tokenizer: Any
    mesh: Any
    ref_cache: Any = None


def start(model_spec: ModelSpec, data_spec: DataSpec, algo: build.AlgoConfig,
          optim_config: optim.OptimConfig, loop: LoopConfig) -> Run:
    """Model, loader, sharded state and the compiled step (before any checkpoint restore)."""
    model, tokenizer = load_model(model_spec)
    mesh = sharding_lib.make_mesh(loop.mesh_shape)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    graphdef, params, base, rest = build.split_model(model, model_spec.lora, loop.seed)
    setup = build.make_setup(graphdef, algo, optim_config, model_spec.lora, loop.logps_chunk)
    build.check_accumulation(algo.loss, data_spec.micro_batches, algo.hyper)
    loader = make_loader(data_spec, tokenizer, loop.seed, model.config.vocab_size, shards,
                         unpaired=setup.loss_kind == "unpaired")
    ref_cache = None
    if algo.reference.kind == "precomputed":
        ref_cache = refcache.load_or_compute(
            algo.reference.cache_dir, loader.data, loader.layout, loader.batch_size, graphdef,
            params if base is None else base, rest, loop.logps_chunk)
    probe = next_batch_m(loader, data_spec.micro_batches, ref_cache)
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "step": 0})
    # The state takes over the loaded weights (donated): they are never held twice.
    state, abstract = build.place_state(setup, params, base, rest, probe, mesh, loop.seed,
                                        donate=True)
    step_fn, state_sh, batch_sh = build.step_lib.compile_train_step(setup, abstract, probe,
                                                                    mesh)
    return Run(setup, state, step_fn, batch_sh, abstract, state_sh, loader, tokenizer, mesh,
               ref_cache)


def to_host(tree):
    """Every array leaf as a whole numpy array on this host (gathered when sharded over hosts).

    Call on every process: gathering arrays that span processes is a collective.
    """
    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def export(run: Run, directory: str) -> str:
    """The policy (LoRA merged) in Hugging Face format, written by process 0.

    Call on every process: parameters sharded over hosts are gathered first, and all processes
    leave together once the export is complete.
    """
    from prefopt_jax.models import save_pretrained
    state = run.state.replace(params=to_host(run.state.params), base=to_host(run.state.base))
    model = nnx.merge(run.setup.graphdef, policy_params(run.setup, state),
                      to_host(run.state.rest))
    if jax.process_index() == 0:
        save_pretrained(model, directory, run.tokenizer)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("export: " + directory)
    return str(directory)


def run_steps(run: Run, data_spec: DataSpec, loop: LoopConfig, ckpt: Checkpointer,
              writer: MetricsWriter, stop: Stop, first: int) -> dict:
    """Steps `first + 1 .. loop.steps`: step, refresh, check, log, checkpoint."""
    values, tokens = {}, 0.0
    with jax.set_mesh(run.mesh):
        for step in range(first + 1, loop.steps + 1):
            batch_m = next_batch_m(run.loader, data_spec.micro_batches, run.ref_cache)
            run.state, metrics = run.step_fn(run.state, to_global(batch_m, run.batch_sh))
            if loop.refresh_reference_every and step % loop.refresh_reference_every == 0:
                run.state = reference.refresh(run.state, policy_params(run.setup, run.state))
            values = means(metrics)
            check_finite(step, values, batch_m, ckpt.latest_step())
            # The global batch's tokens (the step's sum over every host), not this host's.
            tokens += float(jax.device_get(metrics["tokens"][0]))
            writer.write(step, values)
            if step % loop.log_every == 0:
                writer.progress(step, values, tokens)
            due = loop.checkpoint_every and (step % loop.checkpoint_every == 0
                                             or step == loop.steps)
            stopping = stop.agreed()
            if due or stopping:
                ckpt.save(step, run.state, run.loader.state_dict(), force=True)
            if stopping:
                print(f"SIGTERM: checkpointed step {step}; restart to resume", flush=True)
                break
    return values


def train(model_spec: ModelSpec, data_spec: DataSpec, algo: build.AlgoConfig,
          optim_config: optim.OptimConfig, loop: LoopConfig) -> dict:
    """Train (or resume) to `loop.steps`; returns the last step's metric means."""
    run = start(model_spec, data_spec, algo, optim_config, loop)
    ckpt = Checkpointer(os.path.join(loop.output_dir, "checkpoints"), loop.keep_checkpoints)
    first = ckpt.latest_step() or 0
    if first:
        run.state, data_state = ckpt.restore(first, run.abstract, run.state_sh)
        run.loader.load_state_dict(data_state)
    writer = MetricsWriter(loop.output_dir, loop.steps, first)
    stop = Stop()
    try:
        values = run_steps(run, data_spec, loop, ckpt, writer, stop, first)
    finally:
        # Also on a non-finite stop: pending asynchronous saves finish before the error leaves.
        ckpt.close()
        writer.close()
    if loop.export and not stop.requested:
        export(run, os.path.join(loop.output_dir, "export"))
    return values

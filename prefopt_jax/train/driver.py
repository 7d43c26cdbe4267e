"""The one training driver: step, log, checkpoint, resume exactly, stop on SIGTERM, export.

A training loop is a `Task`: it holds the sharded state, says what one step is and where its
data comes from, and how to export what it trained. Everything else lives here, once:

  - resume from the newest complete checkpoint (state, optimiser, step, RNG, loss state, and the
    task's data position, e.g. the loader's, or an iterative method's round and its data);
  - per step: the metrics (JSONL, TensorBoard, a progress line), a non-finite loss stopping the
    run naming the step and the examples, checkpoints every N steps, at the last step and on
    SIGTERM (agreed over every host), keeping K;
  - at the end: the task's export and report.

A run is a pure function of its specs and data: restarting the same command resumes where the
newest checkpoint left off and logs exactly the metrics an uninterrupted run logs. The policy
loop (`train.loop`), reward models (`train.reward_model`) and iterative methods
(`online.iterative`) are tasks; so will be the online RL loop.

Shape letters: `m` micro-batches, `r` rows, `l` row length.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np

from prefopt_jax import data as data_lib
from prefopt_jax.errors import RunDirError
from prefopt_jax.train.checkpoint import Checkpointer
from prefopt_jax.train.metrics import MetricsWriter, means


class Task(Protocol):
    """What the driver needs of a training loop.

    Attributes:
      state: the current TrainState, placed on `mesh` (the task replaces it as it steps).
      abstract: its abstract pytree (shapes and dtypes), for restoring a checkpoint.
      state_sh: its shardings.
      mesh: the device mesh the steps run under.
    """

    state: Any
    abstract: Any
    state_sh: Any
    mesh: Any

    def step(self, number: int) -> tuple[dict[str, float], np.ndarray]:
        """Run step `number` (1-based) on the next batch; (metric means, example indices)."""

    def data_state(self) -> dict:
        """The data position to checkpoint with the state (JSON-able, the same on every host)."""

    def restore(self, state: Any, data_state: dict) -> None:
        """Continue from a checkpoint's state and data position."""

    def export(self, output_dir: str) -> None:
        """Write what was trained under `output_dir` (call on every process)."""

    def report(self, values: dict) -> dict:
        """After a finished run (exported or not): evaluations, returned with the metrics."""


class LoaderTask:
    """A task that steps through one loader: a base for `Task`s (policy, reward model).

    Subclasses set `state`, `abstract`, `state_sh`, `mesh`, `loader`, `micro_batches` (per
    step), `step_fn` (jitted, `(state, batch) -> (state, metrics)`), `batch_sh`, and optionally
    `fillers` (see `next_batch_m`).
    """

    fillers: tuple = ()

    def step(self, number: int) -> tuple[dict, np.ndarray]:
        """One optimiser step on the loader's next batch."""
        batch_m = next_batch_m(self.loader, self.micro_batches, self.fillers)
        self.state, metrics = self.step_fn(self.state, to_global(batch_m, self.batch_sh))
        return means(metrics), batch_m["example_index"]

    def data_state(self) -> dict:
        return self.loader.state_dict()

    def restore(self, state, data_state: dict) -> None:
        self.state = state
        self.loader.load_state_dict(data_state)

    def report(self, values: dict) -> dict:
        return values


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


def check_finite(step: int, values: dict, example_index, last_good: int | None) -> None:
    """A non-finite loss stops the run, naming the step, the examples and the last checkpoint."""
    if np.isfinite(values.get("loss", 0.0)):
        return
    idx = sorted(int(i) for i in np.asarray(example_index).reshape(-1) if i >= 0)
    raise FloatingPointError(
        f"non-finite loss {values.get('loss')} at step {step}; batch examples {idx}; "
        f"last good checkpoint: {last_good if last_good is not None else 'none'}")


def run(task: Task, steps: int, output_dir: str, *, checkpoint_every: int = 100,
        keep_checkpoints: int = 3, log_every: int = 1, export: bool = True) -> dict:
    """Train `task` to `steps` (resuming from `output_dir/checkpoints`); the last metric means.

    Exports (`task.export`) when `export` and the run was not stopped early; the task's report
    follows a finished run either way.
    """
    ckpt = Checkpointer(os.path.join(output_dir, "checkpoints"), keep_checkpoints)
    restored = ckpt.restore_latest(task.abstract, task.state_sh)
    first = 0 if restored is None else restored[0]
    if restored is not None:
        task.restore(*restored[1:])
    if first:
        say(f"resuming from step {first} (checkpoint in {ckpt.directory})")
    writer = MetricsWriter(output_dir, steps, first)
    stop = Stop()
    values, tokens = {}, 0.0
    try:
        with jax.set_mesh(task.mesh):
            for step in range(first + 1, steps + 1):
                values, example_index = task.step(step)
                check_finite(step, values, example_index, ckpt.latest_step())
                tokens += values.get("tokens", 0.0)  # the global batch's, over every host
                writer.write(step, values)
                if step % log_every == 0:
                    writer.progress(step, values, tokens)
                due = checkpoint_every and (step % checkpoint_every == 0 or step == steps)
                stopping = stop.agreed()
                if due or stopping:
                    ckpt.save(step, task.state, task.data_state(), force=True)
                if stopping:
                    print(f"SIGTERM: checkpointed step {step}; restart to resume", flush=True)
                    break
    finally:
        # Also on a non-finite stop: pending asynchronous saves finish before the error leaves.
        ckpt.close()
        writer.close()
    if stop.requested:
        return values
    if export:
        task.export(output_dir)
    values = task.report(values)
    mark_finished(output_dir, steps, values)
    outputs = ["metrics.jsonl", "checkpoints/"] + (["export/"] if export else [])
    say(f"finished step {steps}; outputs in {os.path.abspath(output_dir)}: {', '.join(outputs)}")
    return values


# The run's output directory: held for the run's life, finished runs left alone.

LOCK_FILE = ".prefopt.lock"
FINISHED_FILE = "finished.json"
OPERATIVE = "operative_config.gin"  # written by the gin entry before the run starts
# What `LoopConfig.overwrite` removes before a finished run is trained again.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "export", FINISHED_FILE)
_held: dict[str, list] = {}  # absolute path -> [open lock file, claims]


class RunDir:
    """Holds a run's output directory for the run's life (process 0; a context manager).

    An exclusive `flock` on `output_dir/.prefopt.lock` refuses a second run on the same
    directory, naming the holder's pid and host, instead of letting both interleave their
    logs and checkpoints. The lock dies with its process, so the record a killed run left is
    taken over with a warning. Claims nest: the gin entry point and the run it starts hold the
    directory once.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.abspath(output_dir)
        self.lock_path = os.path.join(self.path, LOCK_FILE)

    def __enter__(self) -> RunDir:
        if jax.process_index() != 0:
            return self
        if self.path in _held:
            _held[self.path][1] += 1
            return self
        os.makedirs(self.path, exist_ok=True)
        f = open(self.lock_path, "a+")
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(f)
            f.close()
            raise RunDirError(
                f"{self.path} is in use by another run (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it "
                "to end or choose another LoopConfig.output_dir") from None
        stale = self._holder(f)
        if stale.get("pid") is not None:
            print(f"warning: taking over {self.lock_path} from pid {stale['pid']} on "
                  f"{stale.get('host', '?')}, which no longer holds it (a run that was killed)",
                  flush=True)
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        f.flush()
        _held[self.path] = [f, 1]
        return self

    def __exit__(self, *exc) -> None:
        held = _held.get(self.path)
        if jax.process_index() != 0 or held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            f = held[0]
            f.seek(0)
            f.truncate()  # a clean end leaves no holder to take over
            f.close()
            del _held[self.path]
            # A run that failed before any output (a bad input, say) leaves no directory.
            left = set(os.listdir(self.path))
            if left == {LOCK_FILE} or (exc[0] is not None and left <= {LOCK_FILE, OPERATIVE}):
                for name in left:
                    os.remove(os.path.join(self.path, name))
                os.rmdir(self.path)

    @staticmethod
    def _holder(f) -> dict:
        f.seek(0)
        try:
            return json.loads(f.read() or "{}")
        except json.JSONDecodeError:
            return {}

    def finished(self, steps: int) -> dict | None:
        """The final metrics of a run that finished `steps` (or more) steps here, else None."""
        try:
            with open(os.path.join(self.path, FINISHED_FILE)) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        return record.get("values", {}) if record.get("steps", -1) >= steps else None

    def clear(self) -> None:
        """Removes a finished run's outputs so it trains again from step 0 (process 0)."""
        if jax.process_index() != 0:
            return
        for name in RUN_OUTPUTS:
            path = os.path.join(self.path, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def mark_finished(output_dir: str, steps: int, values: dict) -> None:
    """Records that a run finished `steps` steps (process 0; after its export and report)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(output_dir, FINISHED_FILE)
    plain = {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}
    with open(path + ".tmp", "w") as f:
        json.dump({"steps": steps, "values": plain}, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def run_config(make_task: Callable[[], Task], loop) -> dict:
    """A configured run (`LoopConfig` `loop`): hold its directory, say where its outputs go,
    leave a finished run alone (unless `loop.overwrite`), build the task and run it."""
    with RunDir(loop.output_dir) as run_dir:
        say(f"run directory: {run_dir.path}")
        done = run_dir.finished(loop.steps)
        if done is not None and not loop.overwrite:
            say(f"this run finished {loop.steps} steps already; its outputs are unchanged "
                f"(LoopConfig.overwrite=True trains it again from step 0)")
            return done
        if done is not None:
            say("LoopConfig.overwrite=True: removing the finished run's checkpoints, metrics "
                "and export, training again from step 0")
            run_dir.clear()
        sync("run directory: " + run_dir.path)
        return run(make_task(), loop.steps, loop.output_dir,
                   checkpoint_every=loop.checkpoint_every, keep_checkpoints=loop.keep_checkpoints,
                   log_every=loop.log_every, export=loop.export)


def say(text: str) -> None:
    """A line on process 0's stdout."""
    if jax.process_index() == 0:
        print(text, flush=True)


# Host batches: every host loads its own slice; the step sees one global batch.

def agreed_shape(loader: data_lib.Loader, count: int) -> data_lib.Shape:
    """The elementwise max shape of the next `count` batches over all hosts (static shapes)."""
    shapes = [loader.peek_shape(ahead) for ahead in range(count)]
    shape_3 = np.max(np.asarray(shapes, np.int64), axis=0)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        shape_3 = np.max(multihost_utils.process_allgather(shape_3), axis=0)
    return data_lib.Shape(*(int(x) for x in shape_3))


def next_batch_m(loader: data_lib.Loader, micro: int, fillers=()) -> dict:
    """`micro` loader batches of one agreed shape, stacked on a leading axis (numpy).

    `fillers`: functions `batch -> batch` adding per-example data computed before training
    (cached reference log-probs, margins of other reward models), applied to each batch.
    """
    shape = agreed_shape(loader, micro)
    batches = [loader.next_batch(min_shape=shape) for _ in range(micro)]
    for fill in fillers:
        batches = [fill(b) for b in batches]
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


def sync(name: str) -> None:
    """Wait for every process (a no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)

"""Orbax checkpoints of the train state and the data position: asynchronous, keep K.

The state is saved as its flat list of leaves (custom pytree nodes such as nnx Variables need no
special handling) and restored into the abstract state's shardings. Orbax writes each step to a
temporary directory and renames it when complete, so a kill during a save leaves the previous
checkpoint as the latest usable one.

`Checkpointer.restore_latest` resumes from the newest intact step: a damaged one (a file missing
or truncated, a restore that fails) is reported in one short paragraph, moved to
`<output_dir>/checkpoints.damaged/<step>-<time>` (nothing is deleted, and a new save of the same
step finds the place free), and the next older step is tried.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from prefopt_jax.errors import RestoreError


def _leaves_dict(tree) -> dict:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _state_args(abstract_state, shardings):
    """The restore arguments of the state's leaves, placed with `shardings`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    return ocp.args.StandardRestore(_leaves_dict(target))


def _unflatten(abstract_state, leaves: dict):
    return jax.tree.unflatten(jax.tree.structure(abstract_state),
                              [leaves[k] for k in sorted(leaves)])


def remove_incomplete(directory: str) -> list[str]:
    """Deletes step directories a killed save left without orbax's final metadata file.

    On local disks orbax renames a finished temporary directory, so this only matters on file
    systems where it writes in place; either way the previous complete step stays the latest.
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.isdigit() and not os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
            shutil.rmtree(path)
            removed.append(name)
    if removed:
        print(f"removed incomplete checkpoint steps {sorted(removed, key=int)} in {directory}",
              flush=True)
    return removed


class Checkpointer:
    """Save / restore (state, data position, extra JSON) under `directory`."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                               enable_async_checkpointing=async_save)
        self.directory = os.path.abspath(directory)
        if jax.process_index() == 0:
            remove_incomplete(self.directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
        """Start an asynchronous save (returns before the write finishes)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(_leaves_dict(state)),
                                  data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, shardings):
        """(state, data position) of a step, the state placed with `shardings`."""
        args = ocp.args.Composite(state=_state_args(abstract_state, shardings),
                                  data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return _unflatten(abstract_state, out["state"]), out["data"]

    def restore_latest(self, abstract_state, shardings):
        """`(step, state, data position)` of the newest intact checkpoint; None when there are none.

        A damaged step is reported (one paragraph on process 0), moved to `damaged_dir()` and
        the next older one tried. Raises RestoreError when none is intact, or when a step does
        not fit `abstract_state` (a different model or optimiser: not damage, so left in place).

        Every process tries the same step (process 0's newest) and they agree on the outcome
        before going on: a step damaged on any process is damaged for all. That keeps them in
        step without process 0 reading state on the others' behalf; only process 0 moves
        directories, and the others wait for the move before they list the steps again.
        """
        tried = []  # (step, why) of each damaged step
        with _closed_loop_noise_dropped() as noise:
            while (step := _agreed_step(self.manager.latest_step())) is not None:
                verdict, why, restored = self._try(step, abstract_state, shardings, noise)
                verdict = _agreed_verdict(verdict)
                if verdict == _OK:
                    return (step, *restored)
                why = why or "the restore failed on another process"
                path = os.path.join(self.directory, str(step))
                if verdict == _MISFIT:
                    raise RestoreError(
                        f"checkpoint step {step} at {path} does not fit this run's state: {why}. "
                        "It was written with another model or optimiser config; use a new "
                        "LoopConfig.output_dir or the config that wrote it.")
                tried.append((step, why))
                self._set_aside(step, path, why)
        if not tried:
            return None
        steps = "; ".join(f"step {s}: {why}" for s, why in tried)
        raise RestoreError(
            f"no intact checkpoint to resume from in {self.directory}: {steps}. They were moved "
            f"to {self.damaged_dir()}; running again starts from step 0.")

    def damaged_dir(self) -> str:
        """Where damaged steps go: `checkpoints.damaged` beside the checkpoints directory."""
        return self.directory.rstrip(os.sep) + ".damaged"

    def _try(self, step: int, abstract_state, shardings, noise: _NoiseGuard):
        """`(verdict, why, (state, data position) or None)` of one restore attempt, quietly.

        What the attempt wrote to stderr is shown only when it succeeded (a failed one's is
        orbax's and TensorStore's report of the same error, hundreds of lines).
        """
        why, restored, held = _visible_fault(os.path.join(self.directory, str(step)),
                                             len(jax.tree.leaves(abstract_state))), None, []
        if why is None:
            with _quiet(held):
                try:
                    restored = self._read(step, abstract_state, shardings)
                except Exception as e:  # noqa: BLE001 -- any failure: report it, try older
                    noise.failed()  # before `e` goes, and with it the abandoned coroutines
                    why = _reason(e)
        if why is None:
            sys.stderr.write(held[0] if held else "")
            return _OK, None, restored
        return (_MISFIT if why.startswith(_MISFIT_PREFIX) else _DAMAGED), why, None

    def _read(self, step: int, abstract_state, shardings):
        """`restore` through orbax's item handlers instead of the manager.

        The manager's restore ends at a barrier of every process, which a process whose read
        failed never reaches; here the processes meet afterwards, at `_agreed_verdict`.
        """
        path = epath.Path(self.directory) / str(step)
        handler = ocp.StandardCheckpointHandler()
        try:
            state = handler.restore(path / "state", args=_state_args(abstract_state, shardings))
        finally:
            handler.close()
        data = ocp.JsonCheckpointHandler().restore(path / "data", args=ocp.args.JsonRestore())
        return _unflatten(abstract_state, state), data

    def _set_aside(self, step: int, path: str, why: str) -> None:
        """Move a damaged step out of the way (process 0) and say so; every process re-lists."""
        if jax.process_index() == 0:
            os.makedirs(self.damaged_dir(), exist_ok=True)
            base = os.path.join(self.damaged_dir(), f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            target, n = base, 0
            while os.path.exists(target):  # the same step set aside twice within a second
                n += 1
                target = f"{base}~{n}"
            shutil.move(path, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint: step {step} set aside")
        self.manager.reload()  # it caches the step list
        if jax.process_index() == 0:
            older = self.manager.latest_step()
            print(f"checkpoint step {step} is damaged: {why}\n"
                  f"  {path} -> moved to {target}\n"
                  f"  {f'trying step {older}' if older is not None else 'no older checkpoint'}",
                  flush=True)

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# Restoring a damaged step: what is checked, how failures read, and keeping orbax quiet.

_OK, _DAMAGED, _MISFIT = 0, 1, 2  # ordered: the processes agree on the worst outcome
_MISFIT_PREFIX = "shape mismatch"
_LOGGERS = ("absl", "asyncio", "orbax")  # orbax logs through absl; asyncio: unretrieved tasks


def _visible_fault(path: str, leaves: int) -> str | None:
    """Why a step directory is visibly incomplete (a file missing, metadata unreadable), or None.

    Cheap checks before a restore. A different number of leaves than the state has is a
    misfit (another config), not damage.
    """
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            return f"missing {name}"
    try:
        with open(os.path.join(path, "state", "_METADATA")) as f:
            meta = json.load(f)
        saved = len(meta["tree_metadata"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state/_METADATA unreadable ({type(e).__name__}: {str(e)[:100]})"
    if saved != leaves:
        return f"{_MISFIT_PREFIX}: {saved} arrays saved, the state has {leaves}"
    if meta.get("use_ocdbt", True):
        state = os.path.join(path, "state")
        manifests = ["manifest.ocdbt"] + [
            os.path.join(d, "manifest.ocdbt") for d in sorted(os.listdir(state))
            if d.startswith("ocdbt.process_")]
        for name in manifests:
            if not os.path.isfile(os.path.join(state, name)):
                return f"missing state/{name}"
    return None


def _reason(error: BaseException) -> str:
    """One line: why a restore failed (the innermost error's first line, without its spec)."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for e in chain:  # a shape that differs from the state's: a config change, not damage
        shapes = re.search(r"Requested shape: (\(.*?\)) is not compatible with the stored "
                           r"shape: (\(.*?\))", str(e))
        if shapes:
            return f"{_MISFIT_PREFIX}: the state wants {shapes[1]}, the checkpoint holds {shapes[2]}"
    text = (str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__])[0]
    text = text.split(" [tensorstore_spec")[0]
    truncated = re.search(r'reading "([^"]+)".*byte range \[(\d+), (\d+)\) is not valid for '
                          r"value of size (\d+)", text)
    if truncated:
        key, _, end, size = truncated.groups()
        leaf, _, chunk = key.partition("/")
        return (f"array file truncated (leaf {leaf} chunk {chunk} needs bytes up to {end}; "
                f"the file holds {size})")
    return text if len(text) <= 240 else text[:237] + "..."


def _agreed_step(step: int | None) -> int | None:
    """Process 0's newest step on every process (each lists the same directory, but may do so
    while another is mid-move)."""
    if jax.process_count() == 1:
        return step
    from jax.experimental import multihost_utils
    agreed = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    return None if agreed < 0 else agreed


def _agreed_verdict(verdict: int) -> int:
    """The worst verdict over every process."""
    if jax.process_count() == 1:
        return verdict
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(verdict))))


@contextlib.contextmanager
def _quiet(held: list):
    """Hold back stderr (Python's and native, fd 2) and orbax/absl/asyncio logs; the held text
    is appended to `held`."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    sys.stderr.flush()
    saved_fd, python_stderr = os.dup(2), sys.stderr
    with tempfile.TemporaryFile() as native:
        os.dup2(native.fileno(), 2)
        sys.stderr = io.StringIO()
        try:
            yield
        finally:
            text, sys.stderr = sys.stderr.getvalue(), python_stderr
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            native.seek(0)
            held.append(native.read().decode(errors="replace") + text)
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class _NoiseGuard:
    """Marks failed attempts for `_closed_loop_noise_dropped`."""

    def __init__(self):
        self.last_failure = None

    def failed(self) -> None:
        self.last_failure = time.monotonic()


@contextlib.contextmanager
def _closed_loop_noise_dropped(quiet_s: float = 0.25, max_wait_s: float = 3.0):
    """Drop what a failed restore's stragglers report after it has failed.

    When one read of a restore fails, orbax's event loop closes while TensorStore still
    completes the others; each completion then reports `RuntimeError: Event loop is closed`
    as an unraisable exception from a TensorStore thread, up to some milliseconds later, and
    the abandoned coroutines and tasks report their errors when they are collected. After a
    failure every unraisable report until the end is theirs: this drops them, waits until they
    have stopped for `quiet_s`, and collects the garbage (whose asyncio "exception was never
    retrieved" logs and "coroutine ... was never awaited" warnings would otherwise come at some
    later collection) before the usual hooks return.
    """
    previous, last = sys.unraisablehook, [0.0]
    guard = _NoiseGuard()

    def hook(report):
        closed_loop = (isinstance(report.exc_value, RuntimeError)
                       and str(report.exc_value) == "Event loop is closed")
        if closed_loop or guard.last_failure is not None:
            last[0] = time.monotonic()
            return
        previous(report)

    sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
        try:
            yield guard
        finally:
            if guard.last_failure is not None:
                asyncio_log.setLevel(logging.CRITICAL + 1)
                deadline = guard.last_failure + max_wait_s
                while time.monotonic() < deadline and \
                        time.monotonic() - max(last[0], guard.last_failure) < quiet_s:
                    time.sleep(0.02)
                gc.collect()
                asyncio_log.setLevel(level)
            sys.unraisablehook = previous

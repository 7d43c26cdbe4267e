"""Orbax checkpoints of the train state and the data position: asynchronous, keep K.

The state is saved as its flat list of leaves (custom pytree nodes such as nnx Variables need no
special handling) and restored into the abstract state's shardings. Orbax writes each step to a
temporary directory and renames it when complete, so a kill during a save leaves the previous
checkpoint as the latest usable one.
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp


def _leaves_dict(tree) -> dict:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


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
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, shardings)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_leaves_dict(target)),
                                  data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        leaves = [out["state"][k] for k in sorted(out["state"])]
        return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves), out["data"]

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

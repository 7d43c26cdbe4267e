"""A deterministic, resumable loader of one host's examples as fixed-shape numpy batches.

The order of an epoch is a pure function of (seed, epoch), and the loader's position is the small
dict {epoch, step, seed, steps_per_epoch}; restoring it yields exactly the batches an uninterrupted
loader would. Each host loads its own slice (see pipeline.prepare) and runs its own Loader with
the same batch size, so every host yields the same number of batches per epoch when
steps_per_epoch is given (see multi-host notes on `Loader`).

Shape letters: `p` examples per batch (batch_size), `n` examples on this host.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from prefopt_jax.data.layout import (LayoutConfig, Shape, check_fits, default_row_length,
                                     make_batch, place)
from prefopt_jax.data.tokenized import TokenizedData


class Loader:
    """Batches of batch_size examples (filler-padded), in a seeded order per epoch.

    Multi-host: shapes are bucketed from this host's examples, so hosts can disagree; the engine
    agrees on one by taking the elementwise max of `peek_shape()` over hosts and passing it to
    `next_batch(min_shape=...)`. Likewise it should pass one steps_per_epoch to every host
    (filler batches make up a shorter slice; a longer slice leaves its tail for that epoch).
    """

    def __init__(self, data: TokenizedData, batch_size: int,
                 layout: LayoutConfig = LayoutConfig(), *, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = False, steps_per_epoch: int | None = None,
                 num_epochs: int | None = 1):
        if len(data) == 0:
            raise ValueError("no examples to load")
        if layout.packs and layout.row_length is None:
            layout = dataclasses.replace(layout, row_length=default_row_length(data, layout))
        check_fits(data, layout)
        self.data, self.batch_size, self.layout = data, int(batch_size), layout
        self.seed, self.shuffle, self.num_epochs = int(seed), shuffle, num_epochs
        natural = len(data) // batch_size if drop_remainder else -(-len(data) // batch_size)
        self.steps_per_epoch = int(steps_per_epoch if steps_per_epoch is not None else natural)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(data)} examples make no batch of {batch_size}")
        self.epoch, self.step = 0, 0
        self._order = (None, None)
        self._peeked = None

    def order(self, epoch: int) -> np.ndarray:
        """This host's example order for an epoch: a permutation seeded by (seed, epoch)."""
        if self._order[0] != epoch:
            n = len(self.data)
            perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
            self._order = (epoch, perm)
        return self._order[1]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        """Local positions of the examples of a batch (fewer than batch_size: filler follows)."""
        return self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]

    def peek_shape(self, ahead: int = 0) -> Shape:
        """The bucketed shape this host needs for the batch `ahead` steps after the next one."""
        return self._placement(*self.position_after(ahead)).shape

    def position_after(self, steps: int) -> tuple[int, int]:
        """(epoch, step) of the batch `steps` batches after the next one."""
        epoch, step = divmod(self.epoch * self.steps_per_epoch + self.step + steps,
                             self.steps_per_epoch)
        return epoch, step

    def _placement(self, epoch: int, step: int):
        if self._peeked is None or self._peeked[0] != (epoch, step):
            idx_p = self.indices(epoch, step)
            self._peeked = ((epoch, step), place(self.data, idx_p, self.batch_size, self.layout))
        return self._peeked[1]

    def next_batch(self, min_shape: Shape | None = None) -> dict:
        """The batch at the current position (at least min_shape), then advances."""
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = make_batch(self.data, self.indices(self.epoch, self.step), self.batch_size,
                           self.layout, min_shape=min_shape,
                           placement=self._placement(self.epoch, self.step))
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_batch()

    def state_dict(self) -> dict:
        """The loader's position, for the checkpoint (the same on every host)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Resumes from a saved position (refuses one taken with another seed or epoch length)."""
        saved = (state["seed"], state.get("steps_per_epoch", self.steps_per_epoch))
        if saved != (self.seed, self.steps_per_epoch):
            raise ValueError(f"loader state {state} was saved with another seed or epoch length "
                             f"(seed {self.seed}, {self.steps_per_epoch} steps per epoch here)")
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"step {state['step']} outside an epoch of {self.steps_per_epoch}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

"""The reference model, one abstraction over its five forms (invariant 6).

A `Reference` answers three questions: which parameters to keep in the state (`init`), the
reference per-token log-probs of a batch inside the step (`logps`), and how it changes after an
optimiser step (`after_step`). Kinds, chosen by name in `ReferenceConfig.kind`:

  frozen       a copy of the initial policy Params, sharded like the policy;
  lora         the base Params with adapters disabled (no copy: `TrainState.base`);
  precomputed  log-probs read from the batch's `ref_logps`, filled by the loop from the on-disk
               cache of `train.refcache` (one pass over the data, reused across runs);
  none         reference-free objectives: nothing loaded, `None` passed to the loss;
  previous     like frozen, and `refresh` replaces it by the current policy (iterative methods;
               the loop calls it every `LoopConfig.refresh_reference_every` steps).

`soft_update_every > 0` adds the TR-DPO soft update `ref <- a * policy + (1 - a) * ref` every N
steps (kinds frozen and previous).

Shape letters: `q` sequences, `c` completion positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from prefopt_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Which reference, and the TR-DPO soft update.

    Attributes:
      kind: one of `KINDS`, or 'auto' (the default): 'lora' under LoRA training, 'frozen'
        otherwise, 'none' for an objective without a reference; chosen when a run is built.
      soft_update_every: apply `ref <- a * policy + (1 - a) * ref` every this many steps (0 = off).
      soft_update_alpha: the mixing weight `a`.
      cache_dir: where precomputed reference log-probs are cached (kind "precomputed").
    """

    kind: str = "auto"
    soft_update_every: int = 0
    soft_update_alpha: float = 0.5
    cache_dir: str = "runs/ref_cache"

    def __post_init__(self):
        if self.kind not in KINDS and self.kind != "auto":
            raise ConfigError(f"ReferenceConfig.kind: unknown reference kind {self.kind!r}; "
                              f"known: auto, {', '.join(KINDS)}")
        if self.soft_update_every and self.kind not in ("frozen", "previous", "auto"):
            raise ConfigError("ReferenceConfig.soft_update_every: the soft TR-DPO update needs "
                              f"reference kind 'frozen' or 'previous', not {self.kind!r}")


def _copy(tree):
    """Fresh buffers, so donating the state never donates one buffer twice."""
    return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass(frozen=True)
class Reference:
    """Strategy object built from a ReferenceConfig; all methods are pure."""

    config: ReferenceConfig

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def scores_new_sequences(self) -> bool:
        """Whether it can score sequences built inside the step (KTO's mismatched completions).

        The precomputed cache holds only the data's own (prompt, completion) sequences.
        """
        return self.kind != "precomputed"

    def init(self, policy: Any) -> Any:
        """Reference Params to keep in the state (None when the kind keeps none)."""
        return _copy(policy) if self.kind in ("frozen", "previous") else None

    def params(self, state) -> Any:
        """The reference's full Params in the state (kinds frozen, previous, lora), else None."""
        if self.kind == "lora":
            return state.base
        return state.ref if self.kind in ("frozen", "previous") else None

    @property
    def has_params(self) -> bool:
        """Whether the step can run the reference model (not only read cached log-probs)."""
        return self.kind in ("frozen", "previous", "lora")

    def logps(self, forward: Callable[[Any], jax.Array], state, batch) -> jax.Array | None:
        """Reference log-probs `[Q, C]` (no gradient) or None when reference-free.

        `forward(params)` runs the model with the given full Params on the batch.
        """
        if self.kind == "none":
            return None
        if self.kind == "precomputed":
            if "ref_logps" not in batch:
                raise ValueError("the precomputed reference reads the batch's cached 'ref_logps'; "
                                 "this batch has none (sequences built inside the step?)")
            return batch["ref_logps"].astype(jnp.float32)
        return jax.lax.stop_gradient(forward(jax.lax.stop_gradient(self.params(state))))

    def after_step(self, state, policy: Any):
        """The state after an optimiser step: the soft TR-DPO update when it is due."""
        every = self.config.soft_update_every
        if not every:
            return state
        a = self.config.soft_update_alpha
        due = (state.step % every) == 0
        ref = jax.tree.map(
            lambda p, r: jnp.where(due, (a * p.astype(jnp.float32)
                                         + (1 - a) * r.astype(jnp.float32)).astype(r.dtype), r),
            policy, state.ref)
        return state.replace(ref=ref)


KINDS = ("frozen", "lora", "precomputed", "none", "previous")


def refresh(state, policy: Any):
    """Previous-iterate reference: the reference becomes (a copy of) the current policy."""
    if state.ref is None:
        raise ValueError("refresh needs a reference kept in the state (kind frozen or previous)")
    return state.replace(ref=_copy(policy))

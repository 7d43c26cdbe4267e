"""The critic of PPO and RTO: a value head trained in the policy's jitted step.

Shape letters: `m` micro-batches, `r` rows, `t` row positions, `d` model width, `q` sequences,
`c` completion positions.

`V(s_t)` is read from the hidden state that predicts completion token t (the batch's
`source_index`, the same positions the log-prob chunks project), so values come from the pass
that gives the log-probs and never need the vocabulary. The head (`models.heads.ValueHead`)
sits either on the policy's own trunk (shared: the value loss, weighted by the objective's
`vf_coef`, also trains the trunk or its LoRA adapters) or on a separate model (any source, a
smaller one allowed), trained whole.

The critic lives in `TrainState.critic = {"params": {"head", "trunk"}, "rest", "opt"}` with
its own optimiser, so a checkpoint holds it and its optimiser state with the policy's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prefopt_jax.losses import ObjectiveError
from prefopt_jax.models.heads import ValueHead
from prefopt_jax.scoring import logps as logps_lib
from prefopt_jax.train import optim
from prefopt_jax.train.state import policy_params, to_f32

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """The value model of objectives that need a critic (ppo, rto).

    Attributes:
      source: None: a head on the policy's trunk (shared); else a separate model's source
        (an HF directory, a .gguf, a built-in name, `tiny` or `random:NAME`) with the policy's
        vocabulary, loaded with the policy's `ModelSpec` settings (dtype, overrides) but no
        LoRA, and trained fully beside the policy.
      seed: initialises the head (and a random separate source).
      mlp_dim: width of the head's hidden layer (0: one linear map).
      init_scale: the head's initial kernel scale (small: values start near 0).
      learning_rate: the critic's peak learning rate (None: the policy's); the rest of the
        optimiser settings are the policy's `OptimConfig`.
    """

    source: str | None = None
    seed: int = 2
    mlp_dim: int = 0
    init_scale: float = 0.1
    learning_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class CriticSetup:
    """Static parts of the critic: graph definitions and its optimiser."""

    head_graphdef: Any
    trunk_graphdef: Any  # None: the policy's trunk (shared)
    tx: Any

    @property
    def shared(self) -> bool:
        return self.trunk_graphdef is None


def load_critic(config: CriticConfig, model_spec, policy_config, optim_config
                ) -> tuple[CriticSetup, dict]:
    """(static setup, initial `{"params": {"head", "trunk"}, "rest"}`) of the critic."""
    from prefopt_jax.models.spec import load_model  # models.spec loads tokenizers: lazily

    trunk_graphdef, trunk, trunk_rest, width = None, None, None, policy_config.hidden_size
    if config.source is not None:
        spec = dataclasses.replace(model_spec, source=config.source, seed=config.seed,
                                   lora=None)
        model, _ = load_model(spec)
        if model.config.vocab_size != policy_config.vocab_size:
            raise ObjectiveError(f"CriticConfig.source {config.source!r} has a vocabulary of "
                                 f"{model.config.vocab_size}, the policy "
                                 f"{policy_config.vocab_size}: the critic reads the policy's "
                                 "tokens")
        trunk_graphdef, trunk, trunk_rest = nnx.split(model, nnx.Param, ...)
        width = model.config.hidden_size
    head = ValueHead(width, mlp_dim=config.mlp_dim, init_scale=config.init_scale,
                     rngs=nnx.Rngs(config.seed))
    head_graphdef, head_params = nnx.split(head, nnx.Param)
    if config.learning_rate is not None:
        optim_config = dataclasses.replace(optim_config, learning_rate=config.learning_rate)
    setup = CriticSetup(head_graphdef, trunk_graphdef, optim.build_optimizer(optim_config))
    return setup, {"params": {"head": head_params, "trunk": trunk}, "rest": trunk_rest}


def init(critic_setup: CriticSetup, initial: dict, fp32_state: bool) -> dict:
    """The critic's state with its optimiser's (pure)."""
    params = initial["params"]
    return {**initial, "opt": critic_setup.tx.init(to_f32(params) if fp32_state else params)}


def critic_values(critic_setup: CriticSetup, params: dict, rest, batch, policy_hidden_rtd: Array
           ) -> Array:
    """`V(s_t)` `[Q, C]` (float32, 0 off the completion mask) of the batch's completion
    positions; `policy_hidden_rtd` feeds a shared head."""
    hidden_rtd = policy_hidden_rtd
    if not critic_setup.shared:
        trunk = nnx.merge(critic_setup.trunk_graphdef, params["trunk"], rest)
        hidden_rtd = logps_lib.model_hidden(trunk, batch)
    r, t, d = hidden_rtd.shape
    index_qc = jnp.clip(batch["source_index"], 0, r * t - 1)
    head = nnx.merge(critic_setup.head_graphdef, params["head"])
    values_qc = head(hidden_rtd.reshape(r * t, d)[index_qc])
    return values_qc * batch["completion_mask"].astype(jnp.float32)


def update(critic_setup: CriticSetup, critic: dict, grads, fp32_state: bool) -> dict:
    """One optimiser step of the critic's parameters (in float32 when `fp32_state`)."""
    params, opt = optim.apply_updates(critic_setup.tx, critic["params"], critic["opt"], grads,
                                      fp32_state)
    return {**critic, "params": params, "opt": opt}


# What the critic reads of a batch.
VALUE_KEYS = ("tokens", "positions", "segment_ids", "branch_ids", "source_index",
              "completion_mask")


def batch_values_fn(setup, state_shardings, mesh):
    """`fn(state, batch_m) -> [M, Q, C]` values of a batch's completion positions under the
    state's critic (and, shared, the state's policy trunk), jitted over the run's mesh; the
    batch holds `VALUE_KEYS` only. The online loop keeps them as the values at sampling time."""
    from jax.sharding import NamedSharding, PartitionSpec

    def fn(state, batch_m):
        def one(batch):
            hidden = None
            if setup.critic.shared:
                model = nnx.merge(setup.graphdef, policy_params(setup, state), state.rest)
                hidden = logps_lib.model_hidden(model, batch)
            return critic_values(setup.critic, state.critic["params"], state.critic["rest"],
                                 batch, hidden)
        return jax.lax.map(one, batch_m)

    return jax.jit(fn, in_shardings=(state_shardings, None),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))

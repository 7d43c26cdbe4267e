"""Value and reward heads: small NNX modules on top of the language model.

- ``ImplicitHead``: parameter-free; per-token implicit reward, Q, V and advantage of a policy
  against its reference (conventions in ``prefopt_jax.tokenmdp.implicit``).
- ``ValueHead``: a learned scalar per token on the final hidden states (PPO/RTO critic, VAS value).
- ``RewardHead``: one score per sequence, read at the last completion token (Bradley-Terry RM).

The heads are plain classes with constructor arguments so configs can bind them; they hold no
reference to the transformer. Parameters carry logical axis names (``embed``, ``mlp``).

Shape suffixes: ``b`` batch rows, ``t`` positions, ``v`` vocabulary, ``d`` model width,
``m`` hidden width of the value MLP.
"""

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from prefopt_jax.tokenmdp import implicit


@flax.struct.dataclass
class ImplicitOutput:
    """Per-token implicit quantities of the taken tokens, each ``[B, T]``, 0 where masked.

    Fields:
      rewards_bt: ``b (l_t - l^ref_t)``, the implicit reward of token t.
      q_bt: ``Q(s_t, y_t)`` with the reference folded in.
      values_bt: ``V(s_t) = b logsumexp_a Q(s_t, a)/b``.
      advantages_bt: ``Q(s_t, y_t) - V(s_t) = b l_t``.
      kl_bt: exact ``KL(pi(.|s_t) || pi_ref(.|s_t))`` over the vocabulary.
    """

    rewards_bt: jax.Array
    q_bt: jax.Array
    values_bt: jax.Array
    advantages_bt: jax.Array
    kl_bt: jax.Array


class ImplicitHead(nnx.Module):
    """Parameter-free head: the policy read as a Q-function against its reference."""

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def __call__(self, logits_btv, ref_logits_btv, tokens_bt, mask_bt) -> ImplicitOutput:
        """Implicit quantities from full policy and reference logits aligned with ``tokens_bt``.

        ``logits_btv[b, t]`` is the distribution over ``tokens_bt[b, t]`` (already shifted).
        """
        mask_bt = jnp.asarray(mask_bt, jnp.float32)
        logps_bt = implicit.take(jax.nn.log_softmax(logits_btv.astype(jnp.float32)), tokens_bt)
        ref_logps_bt = implicit.take(
            jax.nn.log_softmax(ref_logits_btv.astype(jnp.float32)), tokens_bt)
        q_btv = implicit.q_values(logits_btv, ref_logits_btv, self.beta)
        values_bt = implicit.soft_values(q_btv, self.beta)
        q_bt = implicit.take(q_btv, tokens_bt)
        return ImplicitOutput(
            rewards_bt=implicit.token_rewards(logps_bt, ref_logps_bt, mask_bt, self.beta),
            q_bt=q_bt * mask_bt,
            values_bt=values_bt * mask_bt,
            advantages_bt=(q_bt - values_bt) * mask_bt,
            kl_bt=implicit.token_kl(logits_btv, ref_logits_btv, mask_bt),
        )

    def rewards(self, logps_bt, ref_logps_bt, mask_bt):
        """Per-token implicit rewards from target-token log-probs only (no full logits needed)."""
        return implicit.token_rewards(logps_bt, ref_logps_bt, mask_bt, self.beta)


def _dense(in_dim, out_dim, axes, init_scale, rngs, dtype, param_dtype):
    """A linear layer whose kernel and bias carry logical axis names."""
    kernel_init = nnx.initializers.normal(stddev=init_scale / (in_dim ** 0.5))
    # eager_sharding=False: the names are logical, not mesh axes (as in the transformer);
    # models.sharding places the parameters from this metadata.
    return nnx.Linear(
        in_dim, out_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, axes, eager_sharding=False),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:],
                                        eager_sharding=False))


class ValueHead(nnx.Module):
    """Learned scalar per token on hidden states: ``[B, T, D] -> [B, T]`` float32.

    Args:
      d_model: width ``D`` of the hidden states.
      mlp_dim: width of an optional hidden layer (0: a single linear map, the usual critic).
      init_scale: the kernel's init std times ``sqrt(fan_in)``; small values start near 0.
      dtype, param_dtype: compute and parameter dtypes.
    """

    def __init__(self, d_model: int, *, mlp_dim: int = 0, init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        in_dim = mlp_dim or d_model
        # nnx.data: the attribute holds a module or None, so its pytree status must be explicit.
        self.mlp = nnx.data(
            _dense(d_model, mlp_dim, ("embed", "mlp"), 1.0, rngs, dtype, param_dtype)
            if mlp_dim else None)
        axes = ("mlp", None) if mlp_dim else ("embed", None)
        self.out = _dense(in_dim, 1, axes, init_scale, rngs, dtype, param_dtype)

    def __call__(self, hidden_btd):
        """Per-token values ``V(s_t)`` read from the hidden state at each position."""
        x = hidden_btd
        if self.mlp is not None:
            x = jax.nn.gelu(self.mlp(x))
        return self.out(x)[..., 0].astype(jnp.float32)


def last_index(mask_bt):
    """Position of the last nonzero entry of each row (0 for an all-zero row), ``[B]`` int32."""
    mask_bt = jnp.asarray(mask_bt) > 0
    num_t = mask_bt.shape[-1]
    positions_bt = jnp.where(mask_bt, jnp.arange(num_t, dtype=jnp.int32), -1)
    return jnp.maximum(positions_bt.max(axis=-1), 0).astype(jnp.int32)


class RewardHead(nnx.Module):
    """One score per sequence, read at its last completion token (Bradley-Terry reward model).

    Only the ``[B, D]`` hidden states at the read positions are projected.
    """

    def __init__(self, d_model: int, *, init_scale: float = 1.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.out = _dense(d_model, 1, ("embed", None), init_scale, rngs, dtype, param_dtype)

    def __call__(self, hidden_btd, *, mask_bt=None, index_b=None):
        """Scores ``[B]`` float32 at ``index_b``, or at the last position where ``mask_bt`` is 1."""
        if (mask_bt is None) == (index_b is None):
            raise ValueError("RewardHead needs exactly one of mask_bt (completion mask) or index_b")
        if index_b is None:
            index_b = last_index(mask_bt)
        index_b = jnp.asarray(index_b, jnp.int32)
        hidden_bd = jnp.take_along_axis(hidden_btd, index_b[:, None, None], axis=1)[:, 0]
        return self.out(hidden_bd)[..., 0].astype(jnp.float32)

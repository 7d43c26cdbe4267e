"""Decoder-only language model (the Llama family as Hugging Face defines it) in Flax NNX.

Covers Llama 2/3 (RoPE scaling None, "linear", "llama3"), Mistral (optional sliding window),
Qwen2 (q/k/v bias) and SmolLM2 (tied embeddings): GQA/MQA, RoPE with HF's rotate-half layout so
HF weights load unchanged, RMSNorm, SwiGLU. The call, mask and KV-cache contract is the one in
docs/interfaces.md. Log-softmax never happens here: logits come back in the compute dtype.

Shape letters (array-name suffixes):
    b  batch rows                 t  query positions (rows of the call)
    s  key slots (= t without a cache, the cache length S with one)
    d  model width D              f  MLP width F
    v  vocabulary V               h  query heads H
    k  key/value heads K          e  head width Dh
    r  rotary frequencies Dh/2    l  layers L

Logical axis names of parameters (mapped to mesh axes in sharding.py): embed, mlp, heads,
kv_heads, head_dim, vocab, and layers for the stacked axis when ``scan_layers`` is on.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.models.lora import LoraKernel, flat_matmul, lora_dense
from prefopt_jax.models.matmul import matmul
from prefopt_jax.models.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
# XLA:CPU drops the optimisation barriers of jax.checkpoint before its CSE and schedules freely
# across unrolled layers, so the recomputation merges back into the forward pass: a remat
# policy saves no memory unless the layers are a scan (measured, tests/models/test_remat.py).
UNROLLED_REMAT_ON_CPU = (
    "remat_policy={!r} with scan_layers=False saves no activation memory on XLA:CPU (it merges "
    "the recomputation back into the forward pass); set scan_layers=True as well")
# Added to masked attention scores: exp underflows to exactly 0 next to any real score, and
# far enough from float32's minimum that adding a score cannot overflow to -inf.
MASKED_SCORE = -1e30
ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the decoder; hashable so it can be a static jit argument.

    ``rope_scaling`` accepts HF's dict (``{"rope_type": "llama3", "factor": 8.0, ...}``, or the
    older ``"type"`` key) and is stored as a sorted tuple of items; ``None`` means plain RoPE.
    ``attention_bias`` puts biases on q/k/v, ``attention_out_bias`` on the output projection
    (HF Llama's ``attention_bias`` sets both; Qwen2 has only the first).
    ``sliding_window`` (Mistral) limits attention to keys fewer than that many rows back.
    ``scan_layers`` stacks the layers' parameters on a leading axis and runs them as one
    ``nnx.scan`` (one layer compiled, not L); ``remat_policy`` recomputes each layer's
    activations in the backward pass instead of storing them. On XLA:CPU remat needs
    ``scan_layers`` to save anything (``UNROLLED_REMAT_ON_CPU``).
    """

    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    model_type: str = "llama"
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_heads)
        set_("param_dtype", jnp.dtype(self.param_dtype))
        set_("dtype", jnp.dtype(self.dtype))
        if isinstance(self.rope_scaling, Mapping):
            set_("rope_scaling", tuple(sorted(_normalise_rope_scaling(self.rope_scaling).items())))
        self._validate()

    def _validate(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose from "
                             f"{sorted(REMAT_POLICIES)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: "
                             f"{ROPE_TYPES}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}; supported: {MODEL_TYPES}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        """RoPE scaling parameters as a dict (empty for plain RoPE)."""
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        """One of ROPE_TYPES."""
        return self.rope_scaling_dict.get("rope_type", "default")


def _normalise_rope_scaling(scaling: Mapping[str, Any]) -> dict[str, Any]:
    """HF rope_scaling/rope_parameters dict -> our keys (rope_type plus its own parameters)."""
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)  # transformers 5 nests theta here; we keep it separately
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    return {"rope_type": rope_type, **scaling}


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies ``[Dh/2]`` (float32), with HF's linear / llama3 scaling."""
    dh = config.head_dim
    inv_freq_r = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    inv_freq_r = inv_freq_r.astype(np.float32)
    params = config.rope_scaling_dict
    if config.rope_type == "linear":
        return (inv_freq_r / np.float32(params["factor"])).astype(np.float32)
    if config.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq_r, params)
    return inv_freq_r


def _llama3_inv_freq(inv_freq_r: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling: long wavelengths / factor, short ones kept."""
    factor = np.float32(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    wavelen_r = 2 * math.pi / inv_freq_r
    scaled_r = np.where(wavelen_r > old_len / low, inv_freq_r / factor, inv_freq_r)
    smooth_r = (old_len / wavelen_r - low) / (high - low)
    smoothed_r = (1 - smooth_r) * scaled_r / factor + smooth_r * scaled_r
    medium_r = (wavelen_r >= old_len / high) & (wavelen_r <= old_len / low)
    return np.where(medium_r, smoothed_r, scaled_r).astype(np.float32)


def rope_tables(positions_bt: jax.Array, inv_freq_r: np.ndarray, dtype) -> tuple[jax.Array, ...]:
    """cos and sin ``[B, T, Dh]`` for positions, computed in float32 then cast (as HF does)."""
    angles_btr = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_r)
    angles_bte = jnp.concatenate([angles_btr, angles_btr], axis=-1)
    return jnp.cos(angles_bte).astype(dtype), jnp.sin(angles_bte).astype(dtype)


def apply_rope(x_bthe: jax.Array, cos_bte: jax.Array, sin_bte: jax.Array) -> jax.Array:
    """Rotate query/key heads; the two halves of each head form the rotated pairs (HF layout)."""
    half = x_bthe.shape[-1] // 2
    rotated_bthe = jnp.concatenate([-x_bthe[..., half:], x_bthe[..., :half]], axis=-1)
    return x_bthe * cos_bte[:, :, None, :] + rotated_bthe * sin_bte[:, :, None, :]


def attention_mask(seg_q_bt, branch_q_bt, seg_k_bs, branch_k_bs, q_offset,
                   sliding_window: int | None = None) -> jax.Array:
    """Boolean mask ``[B, 1, T, S]`` of the interface contract (causal x segment x branch).

    Query row ``i`` sits at key slot ``q_offset + i``; slot order is row order.
    """
    q_slot_t = q_offset + jnp.arange(seg_q_bt.shape[1], dtype=jnp.int32)
    k_slot_s = jnp.arange(seg_k_bs.shape[1], dtype=jnp.int32)
    allowed_ts = k_slot_s[None, :] <= q_slot_t[:, None]
    if sliding_window is not None:
        allowed_ts &= q_slot_t[:, None] - k_slot_s[None, :] < sliding_window
    same_seg_bts = seg_q_bt[:, :, None] == seg_k_bs[:, None, :]
    branch_k_b1s = branch_k_bs[:, None, :]
    branch_ok_bts = (branch_k_b1s == 0) | (branch_k_b1s == branch_q_bt[:, :, None])
    return (allowed_ts[None] & same_seg_bts & branch_ok_bts)[:, None]


CAUSAL_BLOCK = 64


def attention_block(t: int) -> int | None:
    """Query block of `attend` for T positions attending their own rows: 64, or T / 8 when
    longer rows would need more than 8 blocks; None (one block) when T fits one."""
    block = max(CAUSAL_BLOCK, -(-t // 8))
    return block if t > block else None


def attend(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array,
           mask_b1ts: jax.Array, causal_block: int | None = None,
           heads_first: bool = False) -> jax.Array:
    """Masked softmax attention with grouped query heads, ``[B, T, H, E]`` out.

    Query head ``h`` reads kv head ``h // (H / K)`` (HF's GQA grouping). Scores and softmax are
    float32, and so are both products for low-precision inputs (the result is cast back to the
    query dtype); masked slots get MASKED_SCORE added, which zeroes their probability exactly,
    and a row with no allowed slot (padding) averages all values instead of producing NaN.

    The heads are moved in front once (``[B, K, G, T, E]``, G = H / K queries per kv head) so
    both products are plain batched matmuls over (B, K) with G * T query rows.

    ``causal_block`` (only when query t sits at key slot t, S = T, and the mask is causal): the
    queries go in blocks of that many positions and block ``[lo, hi)`` reads keys ``[0, hi)``
    only, the slots after ``hi`` being masked for all of them. Same result; with blocks of 64
    on SmolLM2's heads XLA:CPU runs the forward 1.9-2.7x and the gradient 1.1-1.9x faster than
    one block at T = 128 to 512 (benchmarks/attention.py, figures in benchmarks/README.md).

    ``heads_first``: keys and values come as ``[B, K, S, E]`` (the KV cache's layout), so they
    need no transpose.
    """
    out_dtype = q_bthe.dtype  # the compute dtype, also when a cache holds float32 keys
    # Low-precision q, k, v are widened: both products then run in float32, which XLA:CPU
    # does faster than its widening bf16 fallback for these small batched dots, the gradient
    # above all (a bf16 DPO step 10% faster on SmolLM2), and no probability is rounded to bf16.
    q_bthe, k_bske, v_bske = (x.astype(jnp.promote_types(x.dtype, jnp.float32))
                              for x in (q_bthe, k_bske, v_bske))
    b, t, h, e = q_bthe.shape
    if heads_first:
        k_bkse, v_bkse = k_bske, v_bske
    else:
        k_bkse, v_bkse = k_bske.transpose(0, 2, 1, 3), v_bske.transpose(0, 2, 1, 3)
    k, s = k_bkse.shape[1], k_bkse.shape[2]
    g = h // k
    q_bkgte = q_bthe.reshape(b, t, k, g, e).transpose(0, 2, 3, 1, 4)
    # An additive bias rather than a select: its gradient is the identity, so the backward
    # materialises no [B, K, G, T, S] broadcast of the mask.
    bias_b11ts = jnp.where(mask_b1ts, np.float32(0), np.float32(MASKED_SCORE))[:, :, None]
    if causal_block is not None and s != t:
        raise ValueError(f"causal_block needs keys = queries, got {s} keys for {t} queries")
    outs = []
    for lo in range(0, t, causal_block or t):
        hi = min(t, lo + (causal_block or t))
        n, keys = hi - lo, (s if causal_block is None else hi)
        q_bkqe = q_bkgte[:, :, :, lo:hi].reshape(b, k, g * n, e)
        scores_bkqs = jnp.einsum("bkqe,bkse->bkqs", q_bkqe,
                                 k_bkse[:, :, :keys]) * np.float32(1 / math.sqrt(e))
        scores_bkgns = scores_bkqs.reshape(b, k, g, n, keys) + bias_b11ts[:, :, :, lo:hi, :keys]
        probs_bkqs = jax.nn.softmax(scores_bkgns, axis=-1)
        out_bkqe = jnp.einsum("bkqs,bkse->bkqe", probs_bkqs.reshape(b, k, g * n, keys),
                              v_bkse[:, :, :keys])
        outs.append(out_bkqe.reshape(b, k, g, n, e))
    out_bkgte = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out_bkgte.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e).astype(out_dtype)


def dense(x: jax.Array, kernel: nnx.Variable, n_in: int, dtype) -> jax.Array:
    """`x`'s last `n_in` dims contracted with the kernel's first `n_in`, in `dtype`, as one 2-D
    matmul (`flat_matmul`); an unmerged LoRA kernel adds its rank-r path."""
    value = kernel.get_value()
    if isinstance(value, LoraKernel):
        return lora_dense(x, value, dtype)
    return flat_matmul(x, value.astype(dtype), n_in)


def _param(rngs: nnx.Rngs, init, shape, names, config: ModelConfig) -> nnx.Param:
    """A parameter carrying logical axis names (placement is done later from this metadata)."""
    # eager_sharding=False: names are logical, not mesh axes; sharding.py resolves them.
    init = nnx.with_partitioning(init, tuple(names), eager_sharding=False)
    return nnx.Param(init(rngs.params(), tuple(shape), config.param_dtype))


_dense_init = nnx.initializers.normal(stddev=0.02)
_zeros_init = nnx.initializers.zeros_init()
_ones_init = nnx.initializers.ones_init()


class RMSNorm(nnx.Module):
    """Root-mean-square norm; statistics in float32, scale applied in the compute dtype."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.dtype = config.dtype
        self.scale = _param(rngs, _ones_init, (config.hidden_size,), ("embed",), config)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32_btd = x_btd.astype(jnp.float32)
        inv_rms_bt1 = jax.lax.rsqrt(jnp.mean(x32_btd * x32_btd, axis=-1, keepdims=True) + self.eps)
        normed_btd = (x32_btd * inv_rms_bt1).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed_btd


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional per-layer KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, e = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.dtype = config.dtype
        self.w_q = _param(rngs, _dense_init, (d, h, e), ("embed", "heads", "head_dim"), config)
        self.w_k = _param(rngs, _dense_init, (d, k, e), ("embed", "kv_heads", "head_dim"), config)
        self.w_v = _param(rngs, _dense_init, (d, k, e), ("embed", "kv_heads", "head_dim"), config)
        self.w_o = _param(rngs, _dense_init, (h, e, d), ("heads", "head_dim", "embed"), config)
        bias = lambda shape, names, on: (  # noqa: E731
            _param(rngs, _zeros_init, shape, names, config) if on else None)
        self.b_q = bias((h, e), ("heads", "head_dim"), config.attention_bias)
        self.b_k = bias((k, e), ("kv_heads", "head_dim"), config.attention_bias)
        self.b_v = bias((k, e), ("kv_heads", "head_dim"), config.attention_bias)
        self.b_o = bias((d,), ("embed",), config.attention_out_bias)

    def _project(self, x_btd, w, b, names):
        out = dense(x_btd, w, 1, self.dtype)  # [B,T,D] @ [D,N,E]
        if b is not None:
            out = out + b[...].astype(self.dtype)
        return constrain(out, names)

    def __call__(self, x_btd, cos_bte, sin_bte, mask_b1ts, kv=None, index=None):
        """Attend; with ``kv = (k_bkse, v_bkse)``, this layer's cache, write the new keys and
        values at slot ``index`` and attend all slots.

        Returns ``(out_btd, new_kv)``; ``new_kv`` is None without a cache.
        """
        q_names = ("batch", "length", "heads", "head_dim")
        kv_names = ("batch", "length", "kv_heads", "head_dim")
        q_bthe = apply_rope(self._project(x_btd, self.w_q, self.b_q, q_names), cos_bte, sin_bte)
        k_btke = apply_rope(self._project(x_btd, self.w_k, self.b_k, kv_names), cos_bte, sin_bte)
        v_btke = self._project(x_btd, self.w_v, self.b_v, kv_names)
        if kv is None:
            # Query t is key slot t and the mask is causal: attend in blocks.
            new_kv = None
            block = attention_block(q_bthe.shape[1])
            out_bthe = attend(q_bthe, k_btke, v_btke, mask_b1ts, block)
        else:
            # Each layer's cache is its own buffer, so the write is in place: a slice of one
            # stacked [L, ...] array written back is a copy of all layers' keys on XLA:CPU.
            start = (0, 0, index, 0)
            new_kv = tuple(
                jax.lax.dynamic_update_slice(
                    cache_bkse, new_btke.transpose(0, 2, 1, 3).astype(cache_bkse.dtype), start)
                for cache_bkse, new_btke in zip(kv, (k_btke, v_btke)))
            out_bthe = attend(q_bthe, *new_kv, mask_b1ts, heads_first=True)
        out_btd = dense(out_bthe, self.w_o, 2, self.dtype)  # [B,T,H,E] @ [H,E,D]
        if self.b_o is not None:
            out_btd = out_btd + self.b_o[...].astype(self.dtype)
        return out_btd, new_kv


class Mlp(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.dtype = config.dtype
        self.w_gate = _param(rngs, _dense_init, (d, f), ("embed", "mlp"), config)
        self.w_up = _param(rngs, _dense_init, (d, f), ("embed", "mlp"), config)
        self.w_down = _param(rngs, _dense_init, (f, d), ("mlp", "embed"), config)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_btf = dense(x_btd, self.w_gate, 1, self.dtype)
        up_btf = dense(x_btd, self.w_up, 1, self.dtype)
        hidden_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "mlp"))
        return dense(hidden_btf, self.w_down, 1, self.dtype)


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = Mlp(config, rngs=rngs)

    def __call__(self, x_btd, cos_bte, sin_bte, mask_b1ts, kv=None, index=None):
        attn_btd, new_kv = self.attn(self.attn_norm(x_btd), cos_bte, sin_bte, mask_b1ts, kv, index)
        x_btd = constrain(x_btd + attn_btd, ("batch", "length", "embed"))
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return constrain(x_btd, ("batch", "length", "embed")), new_kv


def _block_step(block: Block, x_btd, cos_bte, sin_bte, mask_b1ts, kv, index):
    """One layer as a free function, so nnx.remat / nnx.scan can wrap it."""
    return block(x_btd, cos_bte, sin_bte, mask_b1ts, kv, index)


class Transformer(nnx.Module):
    """Decoder-only LM; see docs/interfaces.md for the call, mask and cache contract."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        v, d = config.vocab_size, config.hidden_size
        self.embed = _param(rngs, _dense_init, (v, d), ("vocab", "embed"), config)
        if config.scan_layers:
            self.layers = _stacked_blocks(config, rngs)
        else:
            self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings
                        else _param(rngs, _dense_init, (d, v), ("embed", "vocab"), config))

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, branch_ids_bt=None, *,
                 cache=None, return_hidden=False):
        """Logits ``[B, T, V]`` (or hidden ``[B, T, D]``); with a cache, also the new cache.

        ``positions_bt`` defaults to ``0..T-1`` in every row (shifted by the cache's ``index``
        with a cache): right for one sequence per row starting at its first token. Packed or
        left-padded rows, and prefix-shared ones, must pass their own positions.
        """
        tokens_bt = jnp.asarray(tokens_bt)
        _check_inputs(tokens_bt, positions_bt, segment_ids_bt, branch_ids_bt)
        if positions_bt is None:
            start = 0 if cache is None else jnp.asarray(cache["index"], jnp.int32)
            positions_bt = jnp.broadcast_to(
                start + jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
        seg_bt = _or_fill(segment_ids_bt, tokens_bt.shape, 1)
        branch_bt = _or_fill(branch_ids_bt, tokens_bt.shape, 0)
        x_btd = constrain(jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.config.dtype),
                          ("batch", "length", "embed"))
        cos_bte, sin_bte = rope_tables(jnp.asarray(positions_bt), rope_inv_freq(self.config),
                                       self.config.dtype)
        window = self.config.sliding_window
        if cache is None:
            mask_b1ts = attention_mask(seg_bt, branch_bt, seg_bt, branch_bt, 0, window)
            x_btd, _ = self._run_layers(x_btd, cos_bte, sin_bte, mask_b1ts, None, None)
            new_cache = None
        else:
            index = jnp.asarray(cache["index"], jnp.int32)
            seg_bs = jax.lax.dynamic_update_slice(cache["segment_ids"], seg_bt, (0, index))
            branch_bs = jax.lax.dynamic_update_slice(cache["branch_ids"], branch_bt, (0, index))
            mask_b1ts = attention_mask(seg_bt, branch_bt, seg_bs, branch_bs, index, window)
            kv = (cache["k"], cache["v"])
            x_btd, (k_cache, v_cache) = self._run_layers(x_btd, cos_bte, sin_bte, mask_b1ts, kv,
                                                         index)
            new_cache = {"k": k_cache, "v": v_cache, "segment_ids": seg_bs, "branch_ids": branch_bs,
                         "index": index + tokens_bt.shape[1]}
        hidden_btd = self.final_norm(x_btd)
        out = hidden_btd if return_hidden else self.project(hidden_btd)
        return out if cache is None else (out, new_cache)

    def project(self, hidden_btd: jax.Array, logits_dtype=None) -> jax.Array:
        """Logits from final (already normed) hidden states, in `logits_dtype` (default: the
        compute dtype; float32 keeps a bf16 model's float32 accumulator)."""
        dtype = self.config.dtype
        lead = hidden_btd.shape[:-1]
        hidden_nd = hidden_btd.astype(dtype).reshape(-1, hidden_btd.shape[-1])
        if self.lm_head is None:  # tied: the embedding table [V, D] is the kernel, transposed
            logits_nv = matmul(hidden_nd, self.embed[...].astype(dtype), True, logits_dtype)
        else:
            logits_nv = matmul(hidden_nd, self.lm_head[...].astype(dtype), False, logits_dtype)
        logits = logits_nv.reshape(lead + logits_nv.shape[-1:])
        if logits.ndim == 3:
            logits = constrain(logits, ("batch", "length", "vocab"))
        return logits

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> dict[str, Any]:
        """An empty KV cache: every slot has segment id 0 (empty) and ``index`` is 0.

        Keys and values are a tuple of L arrays ``[B, K, S, E]``, one buffer per layer so each
        layer writes its slots in place; with ``scan_layers`` one stacked ``[L, B, K, S, E]``
        array each, which the scan slices per layer.
        """
        c = self.config
        shape = (batch_size, c.num_kv_heads, max_length, c.head_dim)
        dtype = c.dtype if dtype is None else dtype
        if c.scan_layers:
            k = v = jnp.zeros((c.num_layers, *shape), dtype)
        else:
            k = v = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
        return {"k": k, "v": v,
                "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
                "branch_ids": jnp.zeros((batch_size, max_length), jnp.int32),
                "index": jnp.zeros((), jnp.int32)}

    def _run_layers(self, x_btd, cos_bte, sin_bte, mask_b1ts, kv, index):
        """Apply all layers (python loop or nnx.scan, optionally rematerialised)."""
        step = _block_step
        policy_name = self.config.remat_policy
        if policy_name != "none":
            if not self.config.scan_layers and jax.default_backend() == "cpu":
                warnings.warn(UNROLLED_REMAT_ON_CPU.format(policy_name), stacklevel=2)
            # prevent_cse is only needed outside scan (scan already blocks CSE across the remat).
            step = nnx.remat(step, policy=REMAT_POLICIES[policy_name],
                             prevent_cse=not self.config.scan_layers)
        if self.config.scan_layers:
            scanned = nnx.scan(step, in_axes=(0, nnx.Carry, None, None, None, 0, None),
                               out_axes=(nnx.Carry, 0),
                               transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scanned(self.layers, x_btd, cos_bte, sin_bte, mask_b1ts, kv, index)
        new_kv = []
        for i, block in enumerate(self.layers):
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            x_btd, layer_kv = step(block, x_btd, cos_bte, sin_bte, mask_b1ts, layer_kv, index)
            new_kv.append(layer_kv)
        return x_btd, (None if kv is None else tuple(tuple(x) for x in zip(*new_kv)))


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters carry a leading ``layers`` axis of size L."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs_):
        return Block(config, rngs=rngs_)

    return create(rngs)


def _or_fill(ids_bt, shape, fill: int) -> jax.Array:
    """The given int32 ids, or a constant array when None."""
    if ids_bt is None:
        return jnp.full(shape, fill, jnp.int32)
    return jnp.asarray(ids_bt, jnp.int32)


def _check_inputs(tokens_bt, positions_bt, segment_ids_bt, branch_ids_bt):
    """Fail loudly on rank or shape disagreement (shapes are static, so this costs nothing)."""
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens_bt must be [B, T], got shape {tokens_bt.shape}")
    named = {"positions_bt": positions_bt, "segment_ids_bt": segment_ids_bt,
             "branch_ids_bt": branch_ids_bt}
    for name, value in named.items():
        if value is not None and tuple(jnp.shape(value)) != tuple(tokens_bt.shape):
            raise ValueError(f"{name} has shape {tuple(jnp.shape(value))}, tokens_bt has "
                             f"{tuple(tokens_bt.shape)}")

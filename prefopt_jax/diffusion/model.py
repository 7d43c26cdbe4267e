"""A small class-conditional diffusion transformer (DiT, Peebles & Xie 2023) in Flax NNX.

Images ``[B, H, W, C]`` are cut into ``p x p`` patches, embedded with a fixed 2-D sin-cos position
embedding, and run through transformer blocks whose LayerNorms are modulated (shift, scale)
and whose residual branches are gated by a conditioning vector: the sum of a timestep embedding
(sinusoidal features then an MLP) and a class embedding. The modulation layers and the output
layer start at zero (adaLN-Zero), so every block starts as the identity and the initial
prediction is exactly zero. The class table has one extra row, ``null_label = num_classes``,
the unconditional input of classifier-free guidance (``guided``); the caller drops labels to it
during training (``drop_labels``).

The model predicts ``config.prediction``: the noise (``epsilon``) or ``v``
(``prefopt_jax.diffusion.schedules``). Outputs are float32 whatever the compute dtype.

Shape letters (array-name suffixes):
    b  batch rows              h, w  image height and width     c  channels
    t  patches (tokens)        p  patch vector (patch * patch * C)
    d  model width D           f  MLP width F                   n  heads     e  head width
    k  timestep features       m  modulation vectors (6 per block, 2 at the output)

Logical axis names of parameters (mapped to mesh axes by ``prefopt_jax.models.sharding``):
embed (D), mlp (F, and the hidden width of the timestep MLP), heads, head_dim; the patch
vector, class rows, timestep features and modulation index are unnamed (None) dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefopt_jax.diffusion.schedules import check_prediction
from prefopt_jax.models.sharding import constrain
from prefopt_jax.models.transformer import dense

TIME_FEATURES = 256  # sinusoidal timestep features fed to the timestep MLP (DiT's choice)
LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyperparameters of the DiT; hashable so it can be a static jit argument.

    ``image_size`` is the side of square images with ``channels`` channels; ``patch`` must
    divide it. ``width`` must be a multiple of 4 (the 2-D sin-cos position embedding) and of
    ``heads``. ``num_classes`` real classes; label ``num_classes`` is the null class.
    """

    image_size: int = 8
    channels: int = 1
    patch: int = 2
    width: int = 32
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    prediction: str = "epsilon"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        check_prediction(self.prediction)
        if self.image_size % self.patch:
            raise ValueError(f"patch={self.patch} does not divide image_size={self.image_size}")
        if self.width % 4 or self.width % self.heads:
            raise ValueError(f"width={self.width} must be a multiple of 4 and of "
                             f"heads={self.heads}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return self.image_size, self.image_size, self.channels

    @property
    def null_label(self) -> int:
        """The label of the unconditional (null) class."""
        return self.num_classes

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


# Tests: 8x8 single-channel images in 16 patches.
TINY = DiTConfig()
# scikit-learn's handwritten digits upsampled to 16x16: 64 patches, about 1.8M parameters.
DIGITS = DiTConfig(image_size=16, channels=1, patch=2, width=128, depth=6, heads=4,
                   num_classes=10)
PRESETS = {"tiny": TINY, "digits": DIGITS}


def patchify(x_bhwc: jax.Array, patch: int) -> jax.Array:
    """``[B, H, W, C] -> [B, T, p*p*C]``, patches in row-major order, each row-major inside."""
    b, h, w, c = x_bhwc.shape
    x = x_bhwc.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), -1)


def unpatchify(x_btp: jax.Array, patch: int, shape_hwc: tuple[int, int, int]) -> jax.Array:
    """Inverse of ``patchify``: ``[B, T, p*p*C] -> [B, H, W, C]``."""
    h, w, c = shape_hwc
    b = x_btp.shape[0]
    x = x_btp.reshape(b, h // patch, w // patch, patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def position_embedding(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding ``[grid*grid, width]`` (float32): half the width encodes the
    patch row, half its column, each as sines then cosines of geometric frequencies."""
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def one(pos):
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one(rows), one(cols)], axis=1).astype(np.float32)


def timestep_features(t_b: jax.Array, dim: int = TIME_FEATURES,
                      max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features ``[B, dim]`` (cosines then sines) of (possibly fractional) levels."""
    half = dim // 2
    freqs_k = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles_bk = jnp.asarray(t_b, jnp.float32)[:, None] * freqs_k[None, :]
    return jnp.concatenate([jnp.cos(angles_bk), jnp.sin(angles_bk)], axis=-1)


def drop_labels(labels_b: jax.Array, rate: float, key: jax.Array, *, null_label: int) -> jax.Array:
    """Replace each label by ``null_label`` with probability ``rate`` (classifier-free training)."""
    drop_b = jax.random.bernoulli(key, rate, jnp.shape(labels_b))
    return jnp.where(drop_b, null_label, labels_b).astype(jnp.int32)


def guided(model, x_bhwc: jax.Array, t_b: jax.Array, labels_b: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: ``pred_uncond + scale (pred_cond - pred_uncond)``.

    ``model`` is called once on the doubled batch (conditional rows, then null-label rows);
    a Python ``scale`` of 1 is the plain conditional prediction and costs one undoubled call.
    """
    if isinstance(scale, (int, float)) and scale == 1:
        return model(x_bhwc, t_b, labels_b)
    null_b = jnp.full_like(labels_b, model.null_label)
    both = model(jnp.concatenate([x_bhwc, x_bhwc]), jnp.concatenate([t_b, t_b]),
                 jnp.concatenate([labels_b, null_b]))
    cond, uncond = jnp.split(both, 2)
    return uncond + scale * (cond - uncond)


def _param(rngs: nnx.Rngs, init, shape, names, config: DiTConfig) -> nnx.Param:
    """A parameter carrying logical axis names (placement is done later from this metadata)."""
    # eager_sharding=False: names are logical, not mesh axes; models.sharding resolves them.
    init = nnx.with_partitioning(init, tuple(names), eager_sharding=False)
    return nnx.Param(init(rngs.params(), tuple(shape), config.param_dtype))


def _xavier(in_axis=0, out_axis=-1):
    """Glorot-uniform over the given fan-in and fan-out axes (DiT initialises its linears so)."""
    return nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis,
                                             out_axis=out_axis)


_zeros = nnx.initializers.zeros_init()
_embed_init = nnx.initializers.normal(stddev=0.02)


def _layer_norm(x_btd: jax.Array, dtype) -> jax.Array:
    """LayerNorm without affine parameters (adaLN supplies them); statistics in float32."""
    x32 = x_btd.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)).astype(dtype)


def _modulate(x_btd, shift_bd, scale_bd):
    return x_btd * (1 + scale_bd[:, None]) + shift_bd[:, None]


class Modulation(nnx.Module):
    """adaLN-Zero: ``m`` vectors ``[B, m, D]`` from the conditioning, all zero at init."""

    def __init__(self, config: DiTConfig, m: int, *, rngs: nnx.Rngs):
        d = config.width
        self.dtype = config.dtype
        self.w = _param(rngs, _zeros, (d, m, d), (None, None, "embed"), config)
        self.b = _param(rngs, _zeros, (m, d), (None, "embed"), config)

    def __call__(self, cond_bd: jax.Array) -> jax.Array:
        return dense(jax.nn.silu(cond_bd), self.w, 1, self.dtype) + self.b[...].astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention over all patches (no mask), with biases."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        d, n, e = config.width, config.heads, config.head_dim
        self.dtype = config.dtype
        qkv_names, bias_names = ("embed", "heads", "head_dim"), ("heads", "head_dim")
        self.w_q, self.w_k, self.w_v = (
            _param(rngs, _xavier(0, (1, 2)), (d, n, e), qkv_names, config) for _ in range(3))
        self.b_q, self.b_k, self.b_v = (
            _param(rngs, _zeros, (n, e), bias_names, config) for _ in range(3))
        self.w_o = _param(rngs, _xavier((0, 1), 2), (n, e, d), ("heads", "head_dim", "embed"),
                          config)
        self.b_o = _param(rngs, _zeros, (d,), ("embed",), config)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        names = ("batch", "length", "heads", "head_dim")
        q_btne, k_btne, v_btne = (
            constrain(dense(x_btd, w, 1, self.dtype) + b[...].astype(self.dtype), names)
            for w, b in ((self.w_q, self.b_q), (self.w_k, self.b_k), (self.w_v, self.b_v)))
        out_btne = jax.nn.dot_product_attention(q_btne, k_btne, v_btne)
        return dense(out_btne, self.w_o, 2, self.dtype) + self.b_o[...].astype(self.dtype)


class Mlp(nnx.Module):
    """Feed-forward ``out(gelu(in(x)))`` with DiT's tanh GELU."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        d, f = config.width, config.mlp_dim
        self.dtype = config.dtype
        self.w_in = _param(rngs, _xavier(), (d, f), ("embed", "mlp"), config)
        self.b_in = _param(rngs, _zeros, (f,), ("mlp",), config)
        self.w_out = _param(rngs, _xavier(), (f, d), ("mlp", "embed"), config)
        self.b_out = _param(rngs, _zeros, (d,), ("embed",), config)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        hidden_btf = dense(x_btd, self.w_in, 1, self.dtype) + self.b_in[...].astype(self.dtype)
        hidden_btf = constrain(jax.nn.gelu(hidden_btf, approximate=True),
                               ("batch", "length", "mlp"))
        return dense(hidden_btf, self.w_out, 1, self.dtype) + self.b_out[...].astype(self.dtype)


class Block(nnx.Module):
    """DiT block: ``x + gate * attn(modulate(norm(x)))``, then the same with the MLP."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        self.dtype = config.dtype
        self.modulation = Modulation(config, 6, rngs=rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp = Mlp(config, rngs=rngs)

    def __call__(self, x_btd: jax.Array, cond_bd: jax.Array) -> jax.Array:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.moveaxis(
            self.modulation(cond_bd), 1, 0)
        attn_btd = self.attn(_modulate(_layer_norm(x_btd, self.dtype), shift_a, scale_a))
        x_btd = constrain(x_btd + gate_a[:, None] * attn_btd, ("batch", "length", "embed"))
        mlp_btd = self.mlp(_modulate(_layer_norm(x_btd, self.dtype), shift_m, scale_m))
        return constrain(x_btd + gate_m[:, None] * mlp_btd, ("batch", "length", "embed"))


class TimestepEmbedder(nnx.Module):
    """Timestep embedding ``[B, D]``: sinusoidal features, Linear, SiLU, Linear."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        d, k = config.width, TIME_FEATURES
        self.dtype = config.dtype
        self.w_in = _param(rngs, _embed_init, (k, d), (None, "mlp"), config)
        self.b_in = _param(rngs, _zeros, (d,), ("mlp",), config)
        self.w_out = _param(rngs, _embed_init, (d, d), ("mlp", "embed"), config)
        self.b_out = _param(rngs, _zeros, (d,), ("embed",), config)

    def __call__(self, t_b: jax.Array) -> jax.Array:
        features_bk = timestep_features(t_b).astype(self.dtype)
        hidden_bd = jax.nn.silu(dense(features_bk, self.w_in, 1, self.dtype)
                                + self.b_in[...].astype(self.dtype))
        return dense(hidden_bd, self.w_out, 1, self.dtype) + self.b_out[...].astype(self.dtype)


class DiT(nnx.Module):
    """Class-conditional DiT denoiser: ``(x_t, t, label) -> prediction``, all ``[B, H, W, C]``."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, p = config.width, config.patch_dim
        self.w_patch = _param(rngs, _xavier(), (p, d), (None, "embed"), config)
        self.b_patch = _param(rngs, _zeros, (d,), ("embed",), config)
        self.class_embed = _param(rngs, _embed_init, (config.num_classes + 1, d), (None, "embed"),
                                  config)
        self.time_embed = TimestepEmbedder(config, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.final_modulation = Modulation(config, 2, rngs=rngs)
        self.w_out = _param(rngs, _zeros, (d, p), ("embed", None), config)
        self.b_out = _param(rngs, _zeros, (p,), (None,), config)

    @property
    def prediction(self) -> str:
        return self.config.prediction

    @property
    def null_label(self) -> int:
        return self.config.null_label

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.image_shape

    def __call__(self, x_bhwc: jax.Array, t_b: jax.Array, labels_b: jax.Array) -> jax.Array:
        """The ``config.prediction`` for noised images ``x_bhwc`` at levels ``t_b`` (int or
        float ``[B]``) of classes ``labels_b`` (int ``[B]``, ``null_label`` for none), float32."""
        c, dtype = self.config, self.config.dtype
        if tuple(x_bhwc.shape[1:]) != c.image_shape:
            raise ValueError(f"DiT expects images of shape {c.image_shape}, got "
                             f"{tuple(x_bhwc.shape[1:])}")
        pos_td = position_embedding(c.image_size // c.patch, c.width)
        x_btd = dense(patchify(x_bhwc.astype(dtype), c.patch), self.w_patch, 1, dtype)
        x_btd = constrain(x_btd + self.b_patch[...].astype(dtype) + pos_td.astype(dtype),
                          ("batch", "length", "embed"))
        labels_b = jnp.asarray(labels_b, jnp.int32)
        cond_bd = (self.time_embed(t_b)
                   + jnp.take(self.class_embed[...], labels_b, axis=0).astype(dtype))
        for block in self.blocks:
            x_btd = block(x_btd, cond_bd)
        shift_bd, scale_bd = jnp.moveaxis(self.final_modulation(cond_bd), 1, 0)
        x_btd = _modulate(_layer_norm(x_btd, dtype), shift_bd, scale_bd)
        out_btp = dense(x_btd, self.w_out, 1, dtype) + self.b_out[...].astype(dtype)
        return unpatchify(out_btp, c.patch, c.image_shape).astype(jnp.float32)

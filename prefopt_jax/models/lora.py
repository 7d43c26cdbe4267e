"""LoRA as a separate adapter pytree applied to the base parameters by a pure function.

Shape letters: `i` flattened input dims of a kernel, `o` flattened output dims, `r` LoRA rank,
`y` a leading stacked-layers axis when the model scans over layers.

Adapters live beside the base state, and `apply_lora(base_state, adapters, scale)` returns base
kernels `W + scale * A @ B`; with `factored=True` each adapted kernel is instead a `LoraKernel`
(W, A, B, scale) that the transformer applies unmerged, `x @ W + scale * (x @ A) @ B`, so the
backward pass never forms a full `[i, o]` weight gradient (only activation gradients through W
and rank-r products): the training forwards use it. The reference is the base parameters
themselves (adapters disabled), so LoRA training needs no second copy of the model (invariant 6).
`merge` folds the adapters in for export. Each adapter carries logical axis names (the kernel's
input axes then `lora_rank` for A, `lora_rank` then the output axes for B) so it shards like the
kernel it adapts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from prefopt_jax.models.matmul import matmul

DEFAULT_TARGETS = ("w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters and how big they are.

    Attributes:
      rank: adapter rank r.
      alpha: scale numerator; the update is `(alpha / rank) * A @ B`.
      targets: names of the kernels to adapt (the last part of their state path).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def path_key(path) -> str:
    """A flat state path as one string, e.g. `layers/0/attn/w_q`."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


def logical_names(var: nnx.Variable) -> tuple | None:
    """The variable's logical axis names (`out_sharding` metadata) or None."""
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def kernel_split(shape: tuple[int, ...], names: tuple | None) -> tuple[int, int]:
    """(stacked-layer dims, input dims) of a kernel; the rest are output dims.

    A leading `layers` axis is a batch dim. Kernels that end in `embed` after several axes
    (attention output `[heads, head_dim, embed]`) take all but the last axis as input; every
    other kernel takes its first axis as input (`[embed, heads, head_dim]`, `[embed, mlp]`).
    """
    lead = 1 if names and names[0] == "layers" else 0
    rest = len(shape) - lead
    if names and names[-1] == "embed" and rest > 2:
        return lead, rest - 1
    return lead, 1


def is_target(path, config: LoraConfig) -> bool:
    """True for the kernels named in `config.targets`."""
    return str(getattr(path[-1], "key", path[-1])) in config.targets


def init_adapters(base_state: nnx.State, config: LoraConfig, rng: jax.Array) -> dict:
    """Adapters `{path: {"a": Param, "b": Param}}`: A random (Kaiming-uniform), B zero.

    B = 0 makes the initial policy equal the base model exactly.
    """
    adapters = {}
    for path, var in nnx.to_flat_state(base_state):
        if not is_target(path, config):
            continue
        shape, names = var.get_value().shape, logical_names(var)
        lead, n_in = kernel_split(shape, names)
        lead_shape, in_shape = shape[:lead], shape[lead:lead + n_in]
        out_shape = shape[lead + n_in:]
        rng, sub = jax.random.split(rng)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(sub, lead_shape + in_shape + (config.rank,), jnp.float32,
                               -bound, bound)
        b = jnp.zeros(lead_shape + (config.rank,) + out_shape, jnp.float32)
        a_names = b_names = None
        if names:
            a_names = names[:lead + n_in] + ("lora_rank",)
            b_names = names[:lead] + ("lora_rank",) + names[lead + n_in:]
        # Logical names only: placement happens later, from the rules, under jit.
        with nnx.use_eager_sharding(False):
            adapters[path_key(path)] = {
                "a": nnx.Param(a, **({"out_sharding": a_names} if a_names else {})),
                "b": nnx.Param(b, **({"out_sharding": b_names} if b_names else {})),
            }
    if not adapters:
        raise ValueError(f"LoRA targets {config.targets} match no kernel in the model")
    return adapters


@struct.dataclass
class LoraKernel:
    """An adapted kernel kept unmerged: W `[y.., i.., o..]`, A `[y.., i.., r]`, B `[y.., r, o..]`.

    A pytree (w, a, b) with `scale` static, so nnx.scan slices all three along a stacked-layers
    axis and grad reaches A and B as ordinary leaves.
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False)


def flat_matmul(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """Contract `x`'s last `n_in` dims with `w`'s first `n_in`, as one 2-D matmul.

    `[..., i..] @ [i.., o..] -> [..., o..]` through `[N, I] @ [I, O]` (the reshapes are free:
    both groups are contiguous). XLA:CPU runs the 2-D form, and above all its gradient dots
    (`dy @ W.T`, `x.T @ dy`), as plain GEMMs; the equivalent rank-3/4 einsum is lowered with
    layout copies and runs 1.4x slower under grad (benchmarks/README.md). bf16 operands
    accumulate in float32, forward and backward (`matmul.matmul`).
    """
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    if tuple(x.shape[x.ndim - n_in:]) != tuple(in_shape):
        raise ValueError(f"input trailing dims {x.shape[x.ndim - n_in:]} do not match kernel "
                         f"input dims {in_shape} (kernel shape {w.shape})")
    lead = x.shape[:x.ndim - n_in]
    n_i, n_o = math.prod(in_shape), math.prod(out_shape)
    y = matmul(x.reshape(-1, n_i), w.reshape(n_i, n_o))
    return y.reshape(lead + out_shape)


def lora_dense(x: jax.Array, kernel: LoraKernel, dtype) -> jax.Array:
    """`x @ W + scale * (x @ A) @ B` in `dtype`, for an unstacked kernel.

    `x`'s trailing dims are the kernel's input dims (those of A but its rank axis); the
    rank-r products contract them with A, then r with B.
    """
    w, a, b = (v.astype(dtype) for v in (kernel.w, kernel.a, kernel.b))
    n_in = a.ndim - 1
    if n_in + b.ndim - 1 != w.ndim:
        raise ValueError(f"LoRA kernel shapes W {w.shape}, A {a.shape}, B {b.shape} do not fit "
                         "an unstacked kernel (a stacked-layers axis left unsliced?)")
    xa = flat_matmul(x, a, n_in) * jnp.asarray(kernel.scale, dtype)
    return flat_matmul(x, w, n_in) + flat_matmul(xa, b, 1)


def lora_delta(a: jax.Array, b: jax.Array, lead: int) -> jax.Array:
    """`A @ B` contracted over the rank axis, batched over `lead` stacked-layer axes."""
    a_yir = a.reshape(a.shape[:lead] + (-1, a.shape[-1]))
    b_yro = b.reshape(b.shape[:lead + 1] + (-1,))
    delta_yio = jnp.einsum("...ir,...ro->...io", a_yir, b_yro)
    return delta_yio.reshape(a.shape[:-1] + b.shape[lead + 1:])


def apply_lora(base_state: nnx.State, adapters: dict, scale: float,
               factored: bool = False) -> nnx.State:
    """Base state with `W + scale * A @ B` on every adapted kernel (pure; base untouched).

    `factored`: each adapted kernel holds a `LoraKernel(W, A, B, scale)` instead, which the
    transformer applies unmerged (cheaper backward); only for forwards through the transformer.

    Every Variable of the result is new, the unadapted ones too: `nnx.merge` puts the state's
    Variable objects into the module, and nnx.remat / nnx.scan refuse (TraceContextError) to
    split or update a Variable created at an outer trace level, which the base's are when this
    runs inside a grad or a scan over micro-batches.
    """
    items = []
    for path, var in nnx.to_flat_state(base_state):
        ad = adapters.get(path_key(path))
        if ad is None:
            var = var.copy()
        else:
            w = var.get_value()
            a, b = ad["a"], ad["b"]
            a = a.get_value() if isinstance(a, nnx.Variable) else a
            b = b.get_value() if isinstance(b, nnx.Variable) else b
            if factored:
                var = var.replace(LoraKernel(w, a, b, scale))
            else:
                # W has lead + in + out dims, A lead + in + 1, B lead + 1 + out.
                lead = a.ndim + b.ndim - 2 - w.ndim
                var = var.replace(w + (scale * lora_delta(a, b, lead)).astype(w.dtype))
        items.append((path, var))
    return nnx.from_flat_state(items)


def merge(base_state: nnx.State, adapters: dict, config: LoraConfig) -> nnx.State:
    """Base state with the adapters folded in, for export (same as `apply_lora`)."""
    return apply_lora(base_state, adapters, config.scale)

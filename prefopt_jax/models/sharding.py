"""Logical-axis rules, the device mesh, and shardings derived from parameter metadata.

Every parameter of the model carries logical axis names in its ``out_sharding`` metadata; large
activations are constrained with the same names. One rules table maps each logical name to mesh
axes among ``("data", "fsdp", "tensor")``:

    batch     rows of a batch                        -> ("data", "fsdp")
    length    sequence positions                     -> replicated
    embed     model width D                          -> "fsdp"  (parameters: FSDP/ZeRO-3 shards)
    mlp       MLP hidden width F                     -> "tensor"
    heads     query heads H                          -> "tensor"
    kv_heads  key/value heads K                      -> "tensor"
    head_dim  per-head width Dh                      -> replicated
    vocab     vocabulary V                           -> "tensor"
    layers    stacked-layer axis L (scan_layers)     -> replicated

Two rules resolve what the table alone cannot:

* A mesh axis is used at most once per array: names are resolved left to right and a mesh axis
  already taken by an earlier dimension is dropped. So an activation ``[B, T, D]`` named
  ``("batch", "length", "embed")`` is sharded over data and fsdp on ``B`` only, while the weight
  ``[D, F]`` named ``("embed", "mlp")`` is sharded fsdp x tensor.
* A mesh axis that does not divide a dimension is dropped for that dimension (e.g. SmolLM2's 9
  heads on a tensor axis of 2 stay replicated), because jit in/out shardings need even shards.

Mesh axis types. ``make_mesh`` builds the mesh with ``AxisType.Auto`` on every axis, on purpose:
current ``jax.make_mesh`` defaults to Explicit axes, under which every op whose output sharding
is ambiguous (an einsum contracting an fsdp-sharded width, a gather from a vocab-sharded table)
must be annotated by hand. With Auto axes the shardings we give to parameters (jit in/out
shardings) and to a few activations (``with_sharding_constraint``) are hints from which the
compiler propagates the rest, so one model code path runs on 1 CPU, 8 fake CPU devices or a pod.
Run jitted steps under ``jax.set_mesh(mesh)`` so the activation constraints see the mesh.

Letters: ``B`` batch, ``T`` positions, ``D`` width, ``F`` MLP width, ``H`` heads, ``K`` kv heads,
``Dh`` head width, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: Sequence[int] = (1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[Any] | None = None) -> Mesh:
    """Build a device mesh with Auto axis types (see the module docstring for why)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {shape} needs one size per axis {tuple(axis_names)}")
    count = int(np.prod(shape))
    devices = list(devices) if devices is not None else jax.devices()[:count]
    if len(devices) < count:
        raise ValueError(f"mesh shape {shape} needs {count} devices, found {len(devices)}")
    return jax.make_mesh(shape, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices[:count])


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    """Mesh axes that one logical name maps to (empty tuple: replicated)."""
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no rule; known: {[n for n, _ in rules]}")


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    mesh_shape: dict[str, int], rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Resolve logical axis names for an array of ``shape`` into a PartitionSpec on a mesh."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        chosen = []
        remaining = int(size)
        for axis in _mesh_axes_for(name, rules):
            axis_size = mesh_shape.get(axis, 1)
            # Skip axes taken by an earlier dimension, absent, or not dividing this dimension.
            if axis in used or axis not in mesh_shape or remaining % axis_size:
                continue
            chosen.append(axis)
            used.add(axis)
            remaining //= axis_size
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """Logical names stored on a Variable by ``nnx.with_partitioning`` (None if absent)."""
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def state_shardings(state: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding pytree for an nnx state (concrete or from ``nnx.eval_shape``).

    Variables without logical names (and non-Variable leaves) are replicated.
    """
    mesh_shape = dict(mesh.shape)

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            names = _variable_names(leaf)
            shape = leaf.get_value().shape
            spec = logical_to_spec(names, shape, mesh_shape, rules) if names else PartitionSpec()
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> nnx.Module:
    """Place a model's state on ``mesh`` according to its logical axes (in place; returns it)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def constrain(x: jax.Array, names: Sequence[str | None],
              rules: Rules = LOGICAL_AXIS_RULES) -> jax.Array:
    """Sharding constraint by logical names, a hint for Auto mesh axes.

    A no-op without a mesh (``jax.set_mesh``), on one device, and when any axis is not Auto:
    under Explicit axes shardings travel in the array types, and inside ``shard_map`` (Manual
    axes) a global constraint would be wrong.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not mesh.are_all_axes_auto:
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)

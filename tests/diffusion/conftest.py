"""Fixtures for diffusion tests: tiny DiTs with random parameters, and a jitted forward.

Parameters are drawn with numpy into a model built by ``nnx.eval_shape`` and every model call
goes through one jitted function: on this CPU each eager op and each initialiser would compile
on its own (seconds per model), which the whole folder cannot afford.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.diffusion.model import TINY, DiT


@functools.cache
def _random_dit(seed: int = 0, scale: float = 0.2, **overrides) -> tuple:
    """``(graphdef, state)`` of the tiny DiT, every parameter drawn from N(0, scale^2)."""
    model = nnx.eval_shape(lambda: DiT(dataclasses.replace(TINY, **overrides), rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype) for leaf in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return nnx.split(model)


@pytest.fixture(scope="session")
def random_dit_split():
    """A factory: ``random_dit_split(seed=0, scale=0.2, **DiTConfig overrides)`` is the
    ``(graphdef, state)`` of a tiny DiT with random parameters, cached per arguments."""
    return _random_dit


@pytest.fixture(scope="session")
def random_dit():
    """A factory like ``random_dit_split`` returning a fresh module on the cached parameters."""
    return lambda *args, **kwargs: nnx.merge(*_random_dit(*args, **kwargs))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, x_bhwc, t_b, labels_b):
    return nnx.merge(graphdef, state)(x_bhwc, t_b, labels_b)


@pytest.fixture(scope="session")
def forward():
    """``forward(model, x_bhwc, t_b, labels_b)``: the model's prediction, jitted."""
    return lambda model, *args: _forward(*nnx.split(model), *args)

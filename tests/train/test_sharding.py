"""Sharded steps equal one device: meshes (8,1,1), (2,2,2), (1,4,2) over 5 steps of DPO."""

import jax
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.transformer import Transformer
from prefopt_jax.train import build, optim, tiny

OPT = optim.OptimConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0)
# heads=4 / kv_heads=2 / mlp=64 / vocab=64 so a tensor axis of 2 really shards them.
CONFIG = tiny.config(vocab_size=64)


def trajectory(mesh_shape, batches):
    mesh = sharding_lib.make_mesh(mesh_shape)
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    _, state, step_fn, batch_sh = build.build(model, build.AlgoConfig("dpo"), OPT, batches[0],
                                              mesh)
    losses = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, metrics = step_fn(state, jax.device_put(b, batch_sh))
            s, c = jax.device_get(metrics["loss"])
            losses.append(float(s) / float(c))
    params = jax.device_get(state.params)
    return np.array(losses), params


@pytest.fixture(scope="module")
def batches():
    return [build.stack_micro([tiny.batch("packed", seed=i, n_pairs=8, rows=8)])
            for i in range(5)]


@pytest.fixture(scope="module")
def single(batches):
    return trajectory((1, 1, 1), batches)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_trajectory_equals_single_device(mesh_shape, batches, single):
    losses, params = trajectory(mesh_shape, batches)
    np.testing.assert_allclose(losses, single[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single[1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # Adam amplifies fp noise

"""Batch-coupled losses see the GLOBAL batch: sharded over a mesh == unsharded.

8 fake CPU devices (tests/conftest.py). Every coupled loss runs on a 2x2x2 (data, fsdp, tensor)
mesh with Explicit axes, the batch split over data x fsdp (the losses must gather before
sorting and keep shardings consistent); a few also on a flat 8-way data mesh with Auto axes.
"""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import prefopt_jax.losses as losses
from losses_cases import CASES, default_hyper, family

COUPLED = ["aot", "aot_unpaired", "kto", "bco", "bco_pair", "mpo", "plackett_luce",
           "lipo_lambda", "ppo", "grpo", "dapo", "rloo"]
POLICY = {"pairwise": "logps_w_pc", "unpaired": "logps_nc", "listwise": "logps_pkc",
          "rollout": "logps_nc"}
SIZES = {"pairwise": {"p": 16}, "unpaired": {"n": 16}, "listwise": {"p": 16},
         "rollout": {"g": 8, "k": 2}}


AUTO_TOO = ("aot", "kto", "grpo")


def meshes(name):
    yield "2x2x2-explicit", jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                                          axis_types=(AxisType.Explicit,) * 3), P(("data", "fsdp"))
    if name in AUTO_TOO:
        yield "data8-auto", jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)), P("data")


def _step(name, field, hyper):
    fn = losses.get(name)

    def step(inputs):
        def loss(x):
            out = fn(inputs.replace(**{field: x}), **hyper)
            return losses.mean_loss(out), out

        (_, out), grad = jax.value_and_grad(loss, has_aux=True)(getattr(inputs, field))
        return out, grad

    return step


@pytest.mark.parametrize("name", COUPLED)
def test_sharded_equals_unsharded(name):
    fam = family(name)
    make_case, make_inputs = CASES[fam]
    case = make_case(seed=5, **SIZES[fam])
    inputs = make_inputs(case)
    step = _step(name, POLICY[fam], default_hyper(name, case))
    want_out, want_grad = jax.jit(step)(inputs)
    for mesh_name, mesh, spec in meshes(name):
        shardings = jax.tree.map(lambda _: NamedSharding(mesh, spec), inputs)
        with jax.set_mesh(mesh):
            sharded = jax.device_put(inputs, shardings)
            out, grad = jax.jit(step, in_shardings=(shardings,))(sharded)
        assert len(getattr(sharded, POLICY[fam]).sharding.device_set) == 8  # spread, not copied
        assert getattr(sharded, POLICY[fam]).sharding.spec[0] is not None
        np.testing.assert_allclose(out.loss_p, want_out.loss_p, rtol=1e-6, atol=1e-7,
                                   err_msg=mesh_name)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7, err_msg=mesh_name)
        for key, (total, count) in want_out.metrics.items():
            np.testing.assert_allclose(out.metrics[key][0], total, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{mesh_name} {key}")
            np.testing.assert_allclose(out.metrics[key][1], count, err_msg=f"{mesh_name} {key}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out.state,
                     want_out.state)

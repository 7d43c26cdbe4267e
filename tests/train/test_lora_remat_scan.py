"""LoRA training with scanned and rematerialised layers equals the plain model.

`apply_lora` once returned the base's own (outer-trace) Variables for the unadapted parameters;
nnx.remat and nnx.scan refuse those inside the step's grad and micro-batch scan
(flax TraceContextError), so LoRA with remat or scan_layers could not train.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.hf import model_from_params
from prefopt_jax.models.transformer import Transformer
from prefopt_jax.train import build, optim, step as step_lib, tiny
from prefopt_jax.train.reference import ReferenceConfig

LORA = lora_lib.LoraConfig(rank=2, alpha=4.0)
OPT = optim.OptimConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0)
PLAIN = tiny.config(num_layers=2)


def stacked(adapters: dict, num_layers: int) -> dict:
    """Per-layer adapters (`layers/0/attn/w_q`) -> scanned ones (`layers/attn/w_q`)."""
    out = {}
    for key, ad in adapters.items():
        _, layer, rest = key.split("/", 2)
        if layer != "0":
            continue
        per = [adapters[f"layers/{i}/{rest}"] for i in range(num_layers)]
        out[f"layers/{rest}"] = {
            name: ad[name].replace(np.stack([p[name].get_value() for p in per]))
            for name in ("a", "b")}
    return out


def unstacked(grads: dict, num_layers: int) -> dict:
    """Scanned adapter gradients -> per-layer ones, as plain arrays."""
    out = {}
    for key, ad in grads.items():
        rest = key.split("/", 1)[1]
        for i in range(num_layers):
            out[f"layers/{i}/{rest}"] = {n: np.asarray(v.get_value()[i]) for n, v in ad.items()}
    return out


def loss_and_grads(config, params, adapters):
    """The DPO+LoRA step's loss and adapter gradients for one tiny batch."""
    model = model_from_params(config, params)
    graphdef, _, base, rest = build.split_model(model, LORA, seed=0)
    algo = build.AlgoConfig("dpo", (), ReferenceConfig(kind="lora"))
    setup = build.make_setup(graphdef, algo, OPT, LORA)
    batch_m = build.stack_micro([tiny.batch("padded", seed=3), tiny.batch("padded", seed=4)])
    mesh = sharding_lib.make_mesh((1, 1, 1))
    state, _ = build.place_state(setup, adapters, base, rest, batch_m, mesh, seed=0)
    with jax.set_mesh(mesh):
        grads, metrics, _ = jax.jit(lambda s, b: step_lib.accumulate(setup, s, b))(state, batch_m)
    total, count = jax.device_get(metrics["loss"])
    return float(total) / float(count), grads


@functools.cache
def plain():
    """(params, adapters, loss, adapter grads) of the plain float32 model, computed once for
    every test here (each used to rebuild and run the same plain step)."""
    params = nnx.to_pure_dict(nnx.state(Transformer(PLAIN, rngs=nnx.Rngs(7)), nnx.Param))
    _, _, base, _ = build.split_model(model_from_params(PLAIN, params), LORA, seed=0)
    adapters = lora_lib.init_adapters(base, LORA, jax.random.key(1))
    # Non-zero B: the policy differs from the reference and A gets gradients too.
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
    loss, grads = loss_and_grads(PLAIN, params, adapters)
    return params, adapters, loss, grads


@pytest.mark.filterwarnings("ignore:remat_policy=:UserWarning")  # numerics of unrolled remat
@pytest.mark.parametrize("scan,remat", [(True, "full"), (True, "none"), (False, "full")])
def test_lora_step_with_scan_and_remat_equals_plain(scan, remat):
    params, adapters, want_loss, want_grads = plain()
    config = dataclasses.replace(PLAIN, scan_layers=scan, remat_policy=remat)
    got_loss, got_grads = loss_and_grads(config, params,
                                         stacked(adapters, 2) if scan else adapters)
    assert want_loss != pytest.approx(np.log(2), abs=1e-4)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    if scan:
        got_grads = unstacked(got_grads, 2)
    assert set(got_grads) == set(want_grads)
    for key, ad in want_grads.items():
        for name in ("a", "b"):
            np.testing.assert_allclose(np.asarray(got_grads[key][name]),
                                       np.asarray(ad[name]), rtol=1e-4, atol=1e-6,
                                       err_msg=f"{key}/{name}")


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


@pytest.mark.filterwarnings("ignore:remat_policy=:UserWarning")  # numerics of unrolled remat
@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "dots_saveable"),
                                        (False, "full")])
def test_bf16_compute_lora_step_is_close_to_float32(scan, remat):
    """bf16 compute (float32 params): every matmul, gradient ones included, is a bf16 product
    with float32 accumulation (`models.matmul`); the loss and adapter gradients stay within
    bf16's precision of the float32 step, with scanned and rematerialised layers too."""
    params, adapters, want_loss, want_grads = plain()
    config = dataclasses.replace(PLAIN, dtype=jax.numpy.bfloat16, scan_layers=scan,
                                 remat_policy=remat)
    got_loss, got_grads = loss_and_grads(config, params,
                                         stacked(adapters, 2) if scan else adapters)
    got_grads = unstacked(got_grads, 2) if scan else got_grads
    assert abs(got_loss - want_loss) < 0.02 * abs(want_loss - np.log(2)) + 2e-3
    keys = [(key, name) for key in sorted(want_grads) for name in ("a", "b")]
    want = np.concatenate([np.ravel(want_grads[k][n].get_value()) for k, n in keys])
    got = np.concatenate([np.ravel(got_grads[k][n]) for k, n in keys])
    # The whole gradient, as the optimiser sees it (single tiny entries, orders of magnitude
    # below the largest, are cancellation-dominated in bf16 whatever the accumulator).
    assert 0 < relative_error(got, want) < 0.02, relative_error(got, want)

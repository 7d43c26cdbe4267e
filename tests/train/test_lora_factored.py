"""Unmerged (factored) LoRA equals merged LoRA, and the training step really runs unmerged.

The merged form `x @ (W + s A B)` makes the backward pass form the full weight gradient
`x^T dy` `[in, out]` of every adapted kernel before chaining it to A and B; the factored form
`x @ W + s (x @ A) @ B` needs only rank-r products. The jaxpr test fails if the step merges.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.transformer import Transformer
from prefopt_jax.train import build, optim, step as step_lib, tiny
from prefopt_jax.train.reference import ReferenceConfig

LORA = lora_lib.LoraConfig(rank=2, alpha=4.0)


def split(config):
    """(graphdef, base Params, rest, adapters with non-zero B) of a tiny random model."""
    graphdef, base, rest = nnx.split(Transformer(config, rngs=nnx.Rngs(5)), nnx.Param, ...)
    adapters = lora_lib.init_adapters(base, LORA, jax.random.key(2))
    return graphdef, base, rest, jax.tree.map(lambda x: x + 0.05, adapters)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_factored_forward_and_grads_equal_merged(scan_layers):
    graphdef, base, rest, adapters = split(tiny.config(num_layers=2, scan_layers=scan_layers))
    batch = tiny.batch("packed", seed=1)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["branch_ids"])

    def logits(ad, factored):
        params = lora_lib.apply_lora(base, ad, LORA.scale, factored=factored)
        return nnx.merge(graphdef, params, rest)(*args)

    def loss(ad, factored):
        logp_btv = jax.nn.log_softmax(logits(ad, factored).astype(jnp.float32))
        return jnp.mean(jnp.take_along_axis(logp_btv, batch["tokens"][..., None], -1))

    np.testing.assert_allclose(jax.jit(logits, static_argnums=1)(adapters, True),
                               jax.jit(logits, static_argnums=1)(adapters, False), atol=1e-5)
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (got_loss, got_g), (want_loss, want_g) = grad(adapters, True), grad(adapters, False)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    assert jax.tree.structure(got_g) == jax.tree.structure(want_g)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def dot_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr and its sub-jaxprs (scan, remat, pjit...)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes.extend(dot_shapes(inner))
    return shapes


def full_weight_grads(scan_layers: bool) -> list[tuple[int, ...]]:
    """dot_general outputs of the LoRA DPO step shaped like a whole adapted kernel."""
    config = tiny.config(num_layers=2, scan_layers=scan_layers,
                         remat_policy="full" if scan_layers else "none")
    graphdef, base, rest, adapters = split(config)
    algo = build.AlgoConfig("dpo", (), ReferenceConfig(kind="lora"))
    opt = optim.OptimConfig(learning_rate=1e-2, schedule="constant")
    setup = build.make_setup(graphdef, algo, opt, LORA)
    batch_m = build.stack_micro([tiny.batch("padded", seed=3)])
    mesh = sharding_lib.make_mesh((1, 1, 1))
    state, _ = build.place_state(setup, adapters, base, rest, batch_m, mesh, seed=0)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda s, b: step_lib.accumulate(setup, s, b))(state, batch_m)
    kernels = set()
    for path, var in nnx.to_flat_state(base):
        if lora_lib.is_target(path, LORA):
            shape = var.get_value().shape
            layer_shape = shape[1:] if scan_layers else shape
            names = lora_lib.logical_names(var)
            _, n_in = lora_lib.kernel_split(layer_shape, names[1:] if scan_layers else names)
            # also as the 2-D [inputs, outputs] product the transformer's flat matmuls form
            flat = (math.prod(layer_shape[:n_in]), math.prod(layer_shape[n_in:]))
            kernels |= {tuple(sorted(shape)), tuple(sorted(layer_shape)), tuple(sorted(flat))}
    return [s for s in dot_shapes(jaxpr.jaxpr) if tuple(sorted(s)) in kernels]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_step_forms_no_full_weight_gradient(scan_layers, monkeypatch):
    assert full_weight_grads(scan_layers) == []
    # The check can fail: a step on merged kernels forms [in, out] products (A @ B, x^T dy).
    merged = step_lib.policy_params
    monkeypatch.setattr(step_lib, "policy_params", lambda s, st, factored=False: merged(s, st))
    assert len(full_weight_grads(scan_layers)) >= len(LORA.targets)


def test_sharded_factored_lora_steps_equal_single_device():
    """Unmerged kernels (W, A, B with their own logical names) shard like the merged ones."""
    batches = [build.stack_micro([tiny.batch("packed", seed=i, n_pairs=8, rows=8)])
               for i in range(2)]
    opt = optim.OptimConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0)
    algo = build.AlgoConfig("dpo", (), ReferenceConfig(kind="lora"))
    out = []
    for mesh_shape in [(1, 1, 1), (2, 2, 2)]:
        mesh = sharding_lib.make_mesh(mesh_shape)
        model = Transformer(tiny.config(vocab_size=64, num_layers=2, scan_layers=True),
                            rngs=nnx.Rngs(0))
        _, state, step_fn, batch_sh = build.build(model, algo, opt, batches[0], mesh, lora=LORA)
        with jax.set_mesh(mesh):
            for b in batches:
                state, metrics = step_fn(state, jax.device_put(b, batch_sh))
        out.append((jax.device_get(metrics["loss"]), jax.device_get(state.params)))
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)

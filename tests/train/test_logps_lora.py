"""Chunked log-probs equal the full-logits computation; LoRA as reference equals a frozen copy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax import losses
from prefopt_jax.models.transformer import Transformer
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.scoring import logps as logps_lib
from prefopt_jax.train import tiny


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny.CONFIG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix"])
@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_logps_equal_full_logits(model, layout, chunk):
    batch = tiny.batch(layout, seed=1)
    got = nnx.jit(logps_lib.token_logps, static_argnums=2)(model, batch, chunk)
    want = nnx.jit(logps_lib.naive_token_logps)(model, batch)
    mask = batch["completion_mask"] > 0
    np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), atol=1e-5)


def test_masked_positions_skip_their_chunks():
    """With a mask, only the chunks holding real positions are projected; the rest come back 0."""
    rng = np.random.default_rng(0)
    hidden_rtd = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)
    w_dv = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    source_qc = jnp.asarray(rng.integers(0, 20, size=(4, 10)), jnp.int32)
    targets_qc = jnp.asarray(rng.integers(0, 6, size=(4, 10)), jnp.int32)
    mask_qc = np.zeros((4, 10), np.float32)
    mask_qc[0, :3], mask_qc[2, 1:5] = 1, 1  # 7 real positions of 40: 2 chunks of 4
    projected = []

    def project(h_bmd):
        jax.debug.callback(lambda: projected.append(1))
        return h_bmd @ w_dv

    def logps(mask):
        return jax.jit(lambda: logps_lib.gathered_logps(project, hidden_rtd, source_qc,
                                                        targets_qc, 4, mask))()

    full = np.asarray(logps(None))
    assert len(projected) == 10
    projected.clear()
    got = np.asarray(logps(jnp.asarray(mask_qc)))
    assert len(projected) == 2
    np.testing.assert_allclose(got, np.where(mask_qc > 0, full, 0), rtol=1e-6)


def test_masked_gradient_keeps_one_copy_of_the_projection_weights():
    """The backward of the skipped-chunk map does not save the [D, V] weights once per chunk."""
    rng = np.random.default_rng(0)
    d, v, q, c, m = 64, 8192, 8, 64, 32  # 16 chunks; one copy of the weights is 2 MiB
    w_dv = jnp.asarray(rng.normal(size=(d, v)) * 0.01, jnp.float32)
    hidden_rtd = jnp.asarray(rng.normal(size=(4, 128, d)), jnp.float32)
    source_qc = jnp.asarray(rng.integers(0, 512, size=(q, c)), jnp.int32)
    targets_qc = jnp.asarray(rng.integers(0, v, size=(q, c)), jnp.int32)
    mask_qc = jnp.ones((q, c), jnp.float32)

    def loss(h, w):
        return jnp.sum(logps_lib.gathered_logps(lambda x: x @ w, h, source_qc, targets_qc, m,
                                                mask_qc))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden_rtd, w_dv).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 4 * w_dv.nbytes, f"{temp / 2**20:.1f} MiB of temporaries"


def test_chunked_logps_gradient_equals_full_logits(model):
    batch = tiny.batch("padded", seed=2)
    graphdef, params = nnx.split(model)

    def total(fn, p):
        return jnp.sum(fn(nnx.merge(graphdef, p), batch) * batch["completion_mask"])

    g1 = jax.jit(jax.grad(lambda p: total(lambda m, b: logps_lib.token_logps(m, b, 5), p)))(params)
    g2 = jax.jit(jax.grad(lambda p: total(logps_lib.naive_token_logps, p)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def dpo_loss(logps_fn, policy, reference, batch):
    """DPO loss of a batch from full policy and reference Params (test helper)."""
    pol, ref = logps_fn(policy), logps_fn(reference)
    m = batch["completion_mask"]
    inputs = losses.PairwiseInputs(pol[0::2], pol[1::2], m[0::2], m[1::2], ref[0::2], ref[1::2],
                                   valid_p=batch["pair_valid"])
    return losses.mean_loss(losses.get("dpo")(inputs, beta=0.1))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_lora_reference_equals_frozen_copy(scan_layers):
    config = tiny.config(scan_layers=scan_layers, num_layers=2)  # scan over >1 layer
    graphdef, base, rest = nnx.split(Transformer(config, rngs=nnx.Rngs(3)), nnx.Param, ...)
    lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0)
    adapters = lora_lib.init_adapters(base, lcfg, jax.random.key(0))
    # Non-zero B so the policy differs from the base.
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)
    batch = tiny.batch("padded", seed=4)
    forward = jax.jit(lambda p: logps_lib.token_logps(nnx.merge(graphdef, p, rest), batch, 7))
    frozen_copy = jax.tree.map(jnp.array, base)
    policy = lora_lib.apply_lora(base, adapters, lcfg.scale)
    via_lora = dpo_loss(forward, policy, base, batch)
    via_copy = dpo_loss(forward, lora_lib.merge(frozen_copy, adapters, lcfg), frozen_copy, batch)
    assert float(via_lora) != pytest.approx(np.log(2), abs=1e-4)
    np.testing.assert_allclose(via_lora, via_copy, rtol=1e-6)


def test_lora_starts_at_base_and_carries_logical_axes():
    graphdef, base, rest = nnx.split(Transformer(tiny.CONFIG, rngs=nnx.Rngs(3)), nnx.Param, ...)
    adapters = lora_lib.init_adapters(base, lora_lib.LoraConfig(rank=2), jax.random.key(0))
    merged = lora_lib.apply_lora(base, adapters, 2.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    w_o = [v for k, v in adapters.items() if k.endswith("w_o")][0]
    assert w_o["a"].get_metadata()["out_sharding"] == ("heads", "head_dim", "lora_rank")
    assert w_o["b"].get_metadata()["out_sharding"] == ("lora_rank", "embed")

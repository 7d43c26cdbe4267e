"""Remat policies cut the activation memory of a gradient (XLA's compiled temp size), and the case
that cuts nothing on XLA:CPU, unrolled layers, warns.

Nothing runs: each gradient is compiled and its buffer assignment read.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from prefopt_jax.models.transformer import UNROLLED_REMAT_ON_CPU, Transformer
from prefopt_jax.train import tiny

ROWS, LENGTH = 4, 256
# Wide enough and deep enough that the saved activations dominate the temp buffers.
SHAPE = dict(num_layers=6, hidden_size=64, intermediate_size=256)


def grad_temp_bytes(**overrides) -> int:
    """Temp bytes of the compiled gradient of a mean-logit loss through the model."""
    model = Transformer(tiny.config(**SHAPE, **overrides), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.ones((ROWS, LENGTH), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (ROWS, LENGTH))

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(tokens, positions).astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_with_scanned_layers_saves_most_activation_memory():
    kept = grad_temp_bytes(scan_layers=True, remat_policy="none")
    remat = grad_temp_bytes(scan_layers=True, remat_policy="full")
    assert remat < 0.4 * kept, (remat, kept)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU behaviour")
def test_remat_of_unrolled_layers_warns_and_saves_nothing_on_cpu():
    kept = grad_temp_bytes(remat_policy="none")
    with pytest.warns(UserWarning, match="scan_layers=True") as caught:
        remat = grad_temp_bytes(remat_policy="full")
    # Why the warning exists. If this fails, XLA:CPU now honours remat in unrolled layers and
    # UNROLLED_REMAT_ON_CPU (and this test) can go.
    assert remat > 0.8 * kept, (remat, kept)
    assert str(caught[0].message) == UNROLLED_REMAT_ON_CPU.format("full")


def test_scanned_remat_and_no_remat_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_temp_bytes(scan_layers=True, remat_policy="full")
        grad_temp_bytes(remat_policy="none")

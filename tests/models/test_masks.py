"""The attention-mask contract: packing, prefix sharing, padding (docs/interfaces.md).

Every forward here has the same shape ``[B, 16]`` so that one compiled program serves them all;
shorter sequences are padded at the end with segment 0, which the contract isolates.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models.transformer import attend, attention_block, attention_mask

T = 16


def row(pieces, length=T):
    """Model inputs ``[1, length]`` from pieces (tokens, first position, segment, branch)."""
    arrays = [np.zeros((1, length), np.int32) for _ in range(4)]
    at = 0
    for tokens, pos0, seg, branch in pieces:
        n = len(tokens)
        arrays[0][0, at:at + n] = tokens
        arrays[1][0, at:at + n] = np.arange(pos0, pos0 + n)
        arrays[2][0, at:at + n] = seg
        arrays[3][0, at:at + n] = branch
        at += n
    return [jnp.asarray(a) for a in arrays]


def alone(forward, model, tokens):
    """Logits of one sequence run by itself (padded to T), ``[len, V]``."""
    out = forward(model, *row([(tokens, 0, 1, 0)]))
    return np.asarray(out[0, :len(tokens)])


def test_mask_matches_brute_force():
    """The vectorised mask equals the three rules applied pair by pair, with and without offset."""
    rng = np.random.default_rng(0)
    seg_bs = rng.integers(0, 3, (2, 9)).astype(np.int32)
    branch_bs = rng.integers(0, 3, (2, 9)).astype(np.int32)
    for offset, window in ((0, None), (4, None), (0, 3)):
        seg_q_bt, branch_q_bt = seg_bs[:, offset:offset + 5], branch_bs[:, offset:offset + 5]
        got = np.asarray(attention_mask(seg_q_bt, branch_q_bt, seg_bs, branch_bs, offset, window))
        assert got.shape == (2, 1, 5, 9)
        for b, i, j in itertools.product(range(2), range(5), range(9)):
            slot = offset + i
            want = (j <= slot and seg_bs[b, j] == seg_q_bt[b, i]
                    and branch_bs[b, j] in (0, branch_q_bt[b, i])
                    and (window is None or slot - j < window))
            assert got[b, 0, i, j] == want, (b, i, j, offset, window)


def test_packed_segments_equal_separate_runs(tiny_model, forward):
    model = tiny_model(seed=0)
    rng = np.random.default_rng(1)
    first, second = list(rng.integers(1, 128, 5)), list(rng.integers(1, 128, 8))
    packed = np.asarray(forward(model, *row([(first, 0, 1, 0), (second, 0, 2, 0)])))
    np.testing.assert_allclose(packed[0, :5], alone(forward, model, first), atol=1e-5)
    np.testing.assert_allclose(packed[0, 5:13], alone(forward, model, second), atol=1e-5)
    assert np.all(np.isfinite(packed))  # padding rows attend only to padding: never empty


def test_prefix_shared_branches_equal_separate_runs(tiny_model, forward):
    """Two prefix-shared pairs packed in one row (segments 1 and 2) == four plain sequences."""
    model = tiny_model(seed=0)
    rng = np.random.default_rng(2)
    draw = lambda n: list(rng.integers(1, 128, n))  # noqa: E731
    p1, c1, r1, p2, c2, r2 = draw(3), draw(2), draw(3), draw(2), draw(2), draw(3)
    shared = np.asarray(forward(model, *row([
        (p1, 0, 1, 0), (c1, 3, 1, 1), (r1, 3, 1, 2),
        (p2, 0, 2, 0), (c2, 2, 2, 1), (r2, 2, 2, 2)])))[0]
    at = 0
    for prompt, chosen, rejected in ((p1, c1, r1), (p2, c2, r2)):
        n_p, n_c, n_r = len(prompt), len(chosen), len(rejected)
        with_chosen = alone(forward, model, prompt + chosen)
        with_rejected = alone(forward, model, prompt + rejected)
        np.testing.assert_allclose(shared[at:at + n_p], with_chosen[:n_p], atol=1e-5)
        np.testing.assert_allclose(shared[at + n_p:at + n_p + n_c], with_chosen[n_p:], atol=1e-5)
        np.testing.assert_allclose(shared[at + n_p + n_c:at + n_p + n_c + n_r], with_rejected[n_p:],
                                   atol=1e-5)
        at += n_p + n_c + n_r


@nnx.jit
def hidden_and_projected(model, tokens_bt, positions_bt):
    hidden_btd = model(tokens_bt, positions_bt, return_hidden=True)
    return hidden_btd, model.project(hidden_btd), model(tokens_bt, positions_bt)


def test_defaults_and_return_hidden(tiny_model, forward):
    """segment_ids=None means all ones, branch_ids=None all zeros; project(hidden) == logits."""
    model = tiny_model(seed=0)
    tokens, positions, _, _ = row([(list(range(1, T + 1)), 0, 1, 0)])
    ones, zeros = jnp.ones_like(tokens), jnp.zeros_like(tokens)
    hidden, projected, logits = hidden_and_projected(model, tokens, positions)
    np.testing.assert_array_equal(np.asarray(logits),
                                  np.asarray(forward(model, tokens, positions, ones, zeros)))
    assert hidden.shape == (1, T, 64) and logits.shape == (1, T, 128)
    np.testing.assert_allclose(np.asarray(projected), np.asarray(logits), atol=1e-6)
    # Hidden states come after the final RMSNorm: unit RMS before its scale.
    scale = np.asarray(model.final_norm.scale[...])
    rms = np.sqrt(np.mean((np.asarray(hidden) / scale) ** 2, axis=-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-3)


def test_causal_blocks_equal_one_block_with_packing_branches_and_window():
    """`attend` in query blocks (keys up to each block's end) equals one block, values and
    gradients, on rows with several segments, prefix branches, padding and a sliding window."""
    assert [attention_block(t) for t in (16, 64, 65, 512, 1024)] == [None, None, 64, 64, 128]
    rng = np.random.default_rng(0)
    b, t, h, k, e = 2, 150, 6, 2, 8  # blocks of 64: 64, 64, 22
    seg = np.zeros((b, t), np.int32)
    branch = np.zeros((b, t), np.int32)
    seg[0, :70], seg[0, 70:140] = 1, 2
    branch[0, 30:50], branch[0, 50:70] = 1, 2
    seg[1, :] = 1
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, n, e)), jnp.float32) for n in (h, k, k))
    for window in (None, 40):
        mask = attention_mask(jnp.asarray(seg), jnp.asarray(branch), jnp.asarray(seg),
                              jnp.asarray(branch), 0, window)

        def total(block, *qkv):
            return jnp.sum(jnp.sin(attend(*qkv, mask, block)))

        # Jitted (eager dispatch of the blocked loop costs seconds per call on CPU).
        attend_jit = jax.jit(attend, static_argnums=4)
        np.testing.assert_allclose(attend_jit(q, kk, v, mask, 64),
                                   attend_jit(q, kk, v, mask, None), atol=1e-6)
        grad = jax.jit(jax.grad(total, argnums=(1, 2, 3)), static_argnums=0)
        grads = [grad(block, q, kk, v) for block in (64, None)]
        for a, c in zip(*grads):
            np.testing.assert_allclose(a, c, atol=1e-5)
    with pytest.raises(ValueError, match="causal_block needs keys = queries"):
        attend(q, kk[:, :100], v[:, :100], mask[..., :100], 64)


def test_bf16_attention_computes_in_float32():
    """bf16 q, k, v: both products and the softmax run in float32 (no bf16-rounded
    probabilities), the result is cast back once; gradients come back in bf16."""
    rng = np.random.default_rng(1)
    b, t, h, k, e = 2, 80, 4, 2, 8
    seg = jnp.ones((b, t), jnp.int32)
    mask = attention_mask(seg, jnp.zeros_like(seg), seg, jnp.zeros_like(seg), 0)
    qkv = [jnp.asarray(rng.normal(size=(b, t, n, e)), jnp.bfloat16) for n in (h, k, k)]
    wide = [x.astype(jnp.float32) for x in qkv]
    for block in (None, 64):
        out = attend(*qkv, mask, block)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out, np.float32),
                                      np.asarray(attend(*wide, mask, block).astype(jnp.bfloat16),
                                                 np.float32))
    # The forward above runs eagerly on purpose: under jit XLA:CPU may keep bf16 intermediates
    # in float32 and an attention computing in bf16 would pass. The gradient's dtypes are fixed
    # at trace time, so it is jitted (eager, its backward compiles every op).
    grads = jax.jit(jax.grad(lambda *x: jnp.sum(attend(*x, mask).astype(jnp.float32) ** 2),
                             argnums=(0, 1, 2)))(*qkv)
    assert [g.dtype for g in grads] == [jnp.dtype(jnp.bfloat16)] * 3

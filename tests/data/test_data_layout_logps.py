"""Padded, packed and prefix-shared layouts give the same log-probs through a real (tiny) model.

This is the test that the masks are right: the model honours segment_ids and branch_ids as
docs/interfaces.md defines them, and each layout's source_index reads the right positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.data import LAYOUTS, DataConfig, LayoutConfig, Shape, make_batch, prepare
from prefopt_jax.data.synthetic import synthetic_rows
from prefopt_jax.models import ModelConfig, Transformer


def token_logps(model, batch):
    """Per-token completion log-probs [Q, C] by the batch contract (masked to 0 elsewhere)."""
    graph, state = nnx.split(model)
    inputs = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "branch_ids",
                                    "source_index", "target_tokens", "completion_mask")}
    return np.asarray(_token_logps(graph, state, inputs))


@jax.jit(static_argnums=0)
def _token_logps(graph, state, batch):
    model = nnx.merge(graph, state)
    hidden_rld = model(batch["tokens"], batch["positions"], batch["segment_ids"],
                       batch["branch_ids"], return_hidden=True)
    r, l, d = hidden_rld.shape
    hidden_qcd = hidden_rld.reshape(r * l, d)[batch["source_index"]]
    logps_qcv = jax.nn.log_softmax(model.project(hidden_qcd).astype(jnp.float32), axis=-1)
    target_qc1 = jnp.asarray(batch["target_tokens"])[..., None]
    logps_qc = jnp.take_along_axis(logps_qcv, target_qc1, axis=-1)[..., 0]
    return logps_qc * batch["completion_mask"]


# One shape for every batch here (extra padding is harmless, see the last test), so the
# forward pass compiles once rather than once per layout.
SHAPE = Shape(rows=32, length=256, completion=64)


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random decoder; weights drawn with numpy (no XLA compile for initialisers)."""
    config = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2)
    graph, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape)
        return (noise + (len(leaf.shape) == 1)).astype(leaf.dtype)

    return nnx.merge(graph, jax.tree.map(draw, abstract))


@pytest.mark.parametrize("fmt,kw", [("preference", {}),
                                    ("ranked", {"ranked": "listwise", "list_size": 5})])
def test_layouts_give_identical_logps(tok, model, fmt, kw):
    rows = synthetic_rows(6, fmt, conversational=True, seed=11, prompt_words=4,
                          completion_words=4)
    data, _ = prepare(rows, tok, DataConfig(cache_dir=None, **kw))
    idx = np.array([3, 0, 5, 1, 4])
    logps, sums = {}, {}
    for layout in LAYOUTS:
        batch = make_batch(data, idx, 6, LayoutConfig(kind=layout, row_length=256),
                           min_shape=SHAPE)
        assert batch["tokens"].shape == SHAPE[:2]
        logps[layout] = token_logps(model, batch)
        sums[layout] = logps[layout].sum(axis=1).reshape(6, data.num_completions)
    reference = logps["padded"]
    assert (reference != 0).any(axis=1).sum() == (data.completion_lengths_nk[idx] > 0).sum()
    for layout in LAYOUTS[1:]:
        np.testing.assert_allclose(logps[layout], reference, atol=2e-5, rtol=2e-5,
                                   err_msg=f"{layout} vs padded")
        np.testing.assert_allclose(sums[layout], sums["padded"], atol=1e-4, rtol=1e-5,
                                   err_msg=f"{layout} pair sums vs padded")


def test_logps_do_not_depend_on_extra_padding(tok, model):
    rows = synthetic_rows(3, "preference", seed=4, prompt_words=4, completion_words=4)
    data, _ = prepare(rows, tok, DataConfig(cache_dir=None))
    layout = LayoutConfig(kind="prefix_packed", row_length=128)
    tight = token_logps(model, make_batch(data, np.arange(3), 3, layout))
    loose = token_logps(model, make_batch(data, np.arange(3), 3, layout, min_shape=SHAPE))
    np.testing.assert_allclose(loose[:, :tight.shape[1]], tight, atol=2e-5, rtol=2e-5)


def test_split_examples_give_identical_logps(tok, model):
    # Rows just long enough for the longest prompt + completion: listwise examples of 5 are cut
    # into runs, each with its own prompt copy; the log-probs are the padded layout's.
    rows = synthetic_rows(6, "ranked", conversational=True, seed=11, prompt_words=4,
                          completion_words=4)
    data, _ = prepare(rows, tok, DataConfig(cache_dir=None, ranked="listwise", list_size=5))
    idx = np.array([3, 0, 5, 1, 4])
    need = int((data.prompt_lengths_n[:, None] + data.completion_lengths_nk).max())
    split = LayoutConfig(kind="prefix_packed", row_length=need, split_examples=True)
    batch = make_batch(data, idx, 6, split)
    assert batch["tokens"].shape[1] == need
    assert sum(len(set(s[s > 0])) for s in batch["segment_ids"]) > len(idx)  # examples were cut
    batch = make_batch(data, idx, 6, split, min_shape=SHAPE)
    padded = make_batch(data, idx, 6, LayoutConfig(kind="padded"), min_shape=SHAPE)
    np.testing.assert_allclose(token_logps(model, batch), token_logps(model, padded),
                               atol=2e-5, rtol=2e-5)


def test_rows_filled_in_order_give_identical_logps(model):
    # Runs cut where the rows end (layout.filled_runs: 3 rows of 12, where prefix_runs' runs
    # need 4), the second example's first run starting mid-row after the first example's last
    # run: the padded layout's log-probs.
    from prefopt_jax.data.tokenized import from_lists

    rng = np.random.default_rng(5)
    lengths = [2, 1, 8, 6, 5, 1]
    data = from_lists("listwise", 3, [rng.integers(3, 40, 2) for _ in range(2)],
                      [rng.integers(3, 40, n) for n in lengths], np.arange(2), {})
    idx = np.array([0, 1])
    split = LayoutConfig(kind="prefix_packed", row_length=12, split_examples=True)
    tight = make_batch(data, idx, 2, split)
    assert tight["tokens"].shape == (3, 12)
    assert tight["segment_ids"][1].tolist() == [1] * 3 + [2] * 8 + [0]  # 2 + 1, then 2 + 6
    batch = make_batch(data, idx, 2, split, min_shape=SHAPE)
    padded = make_batch(data, idx, 2, LayoutConfig(kind="padded"), min_shape=SHAPE)
    np.testing.assert_allclose(token_logps(model, batch), token_logps(model, padded),
                               atol=2e-5, rtol=2e-5)

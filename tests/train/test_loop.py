"""The loop: precomputed reference cache, previous-iterate refresh, soft TR-DPO, NaN stop,
half-written checkpoints, HF export with merged LoRA.

Every run is the same 1-layer tiny model on 8 synthetic pairs, so runs that build the same
step share one compile through the session's persistent compilation cache.
"""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models.lora import LoraConfig
from prefopt_jax.train import build, driver, loop, optim, refcache
from prefopt_jax.train.reference import ReferenceConfig
from prefopt_jax.train.state import policy_params
from prefopt_jax.data.synthetic import tiny_data

OPT = optim.OptimConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0)
MODEL = loop.ModelSpec(overrides={"num_layers": 1})
DATA = loop.DataSpec(batch_size=4, tiny_examples=8)
# One batch of 4 examples: every step has the same shape, so a run compiles its step once (DATA's
# two batches have two shapes). For tests that compare nothing with the `frozen` run.
ONE_SHAPE = loop.DataSpec(batch_size=4, tiny_examples=4)


def train(out_dir, steps=3, reference=ReferenceConfig(), model=MODEL, data=DATA, **loop_kw):
    """Run the loop; returns the metric records it wrote."""
    loop_kw = {"checkpoint_every": 0, "export": False, **loop_kw}
    config = loop.LoopConfig(steps=steps, output_dir=str(out_dir), **loop_kw)
    loop.train(model, data, build.AlgoConfig("dpo", (), reference), OPT, config)
    return records(out_dir)


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(recs):
    return np.array([r["loss"] for r in recs])


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    return train(tmp_path_factory.mktemp("frozen"))


def test_precomputed_reference_equals_frozen_and_is_cached(tmp_path, frozen, monkeypatch):
    calls = []
    evaluate = refcache.evaluate_reference
    monkeypatch.setattr(refcache, "evaluate_reference",
                        lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    ref = ReferenceConfig(kind="precomputed", cache_dir=str(tmp_path / "cache"))
    first = train(tmp_path / "a", reference=ref)
    second = train(tmp_path / "b", reference=ref)
    assert len(calls) == 1, "the second run must read the cache, not evaluate the reference"
    assert len(os.listdir(tmp_path / "cache")) == 1
    np.testing.assert_allclose(losses(first), losses(frozen), rtol=1e-5)
    np.testing.assert_allclose(losses(second), losses(first), rtol=0)


def test_packed_rows_of_a_length_step_train_like_padded_rows(tmp_path, frozen):
    data = dataclasses.replace(DATA, layout="prefix_packed", length_step=8)
    loader = loop.make_loader(data, None, 0, 512)
    lengths = {loader.next_batch()["tokens"].shape[1] for _ in range(4)}
    assert all(n % 8 == 0 for n in lengths) and any(n & (n - 1) for n in lengths), lengths
    np.testing.assert_allclose(losses(train(tmp_path, data=data)), losses(frozen), rtol=2e-5)


def test_refresh_every_step_keeps_the_dpo_loss_at_log2(tmp_path, frozen):
    """Reference = the previous iterate: at every step start policy == reference, so h = 0."""
    recs = train(tmp_path, reference=ReferenceConfig(kind="previous"),
                 refresh_reference_every=1)
    np.testing.assert_allclose(losses(recs), math.log(2), atol=1e-6)
    assert abs(losses(frozen)[-1] - math.log(2)) > 1e-4  # a frozen reference does move


def test_soft_update_every_step_with_alpha_1_is_a_refresh(tmp_path):
    ref = ReferenceConfig(kind="frozen", soft_update_every=1, soft_update_alpha=1.0)
    np.testing.assert_allclose(losses(train(tmp_path, reference=ref, data=ONE_SHAPE)),
                               math.log(2), atol=1e-6)
    half = ReferenceConfig(kind="frozen", soft_update_every=2, soft_update_alpha=1.0)
    recs = losses(train(tmp_path / "half", steps=4, reference=half, data=ONE_SHAPE))
    # Updated after steps 2 and 4 only: step 3 starts at h = 0, step 2 does not.
    assert abs(recs[2] - math.log(2)) < 1e-6 and abs(recs[1] - math.log(2)) > 1e-6


def test_non_finite_loss_stops_naming_step_examples_and_checkpoint(tmp_path, monkeypatch):
    means = driver.means
    poisoned = lambda m: {**means(m), "loss": float("nan")} if records_len(tmp_path) == 2 \
        else means(m)  # noqa: E731
    monkeypatch.setattr(driver, "means", poisoned)
    config = loop.LoopConfig(steps=4, output_dir=str(tmp_path), checkpoint_every=1,
                             export=False)
    with pytest.raises(FloatingPointError) as err:
        loop.train(MODEL, DATA, build.AlgoConfig("dpo"), OPT, config)
    message = str(err.value)
    assert "at step 3" in message and "last good checkpoint: 2" in message
    examples = [int(x) for x in message.split("batch examples [")[1].split("]")[0].split(",")]
    assert len(examples) == DATA.batch_size and all(0 <= e < DATA.tiny_examples
                                                    for e in examples)


def records_len(out_dir):
    path = os.path.join(out_dir, "metrics.jsonl")
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def test_half_written_checkpoint_is_ignored_on_restart(tmp_path, frozen):
    """A save killed midway leaves only a temporary directory: restart from the previous one."""
    config = dict(checkpoint_every=2)
    train(tmp_path, steps=2, **config)
    ckpt_dir = tmp_path / "checkpoints"
    partial = ckpt_dir / "3.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    (ckpt_dir / "3").mkdir()  # a step directory without orbax's commit marker
    recs = train(tmp_path, steps=3, **config)
    assert [r["step"] for r in recs] == [1, 2, 3]
    np.testing.assert_allclose(losses(recs), losses(frozen), rtol=1e-6)


def test_export_loads_in_transformers_with_merged_lora(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    runs, export = [], loop.export
    monkeypatch.setattr(loop, "export", lambda run, d: runs.append(run) or export(run, d))
    model = loop.ModelSpec(overrides={"num_layers": 1}, lora=LoraConfig(rank=2, alpha=4.0))
    spec = loop.LoopConfig(steps=2, output_dir=str(tmp_path), checkpoint_every=0, export=True)
    loop.train(model, ONE_SHAPE, build.AlgoConfig("dpo", (), ReferenceConfig(kind="lora")), OPT,
               spec)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    tokens_bt = np.arange(1, 12, dtype=np.int32)[None]
    with torch.no_grad():
        got = hf(torch.from_numpy(tokens_bt.astype(np.int64))).logits.numpy()
    run = runs[0]
    policy = nnx.merge(run.setup.graphdef, policy_params(run.setup, run.state), run.state.rest)
    base = loop.load_model(model)[0]
    np.testing.assert_allclose(got, logits(policy, tokens_bt), atol=1e-4)
    assert np.max(np.abs(got - logits(base, tokens_bt))) > 1e-3  # the adapters were merged


@nnx.jit
def _forward(model, tokens_bt, positions_bt):
    return model(tokens_bt, positions_bt)


def logits(model, tokens_bt):
    """Jitted (eager dispatch compiles every op of the forward, ~180 programs)."""
    positions_bt = np.arange(tokens_bt.shape[1], dtype=np.int32)[None]
    return np.asarray(_forward(model, tokens_bt, positions_bt))


def test_reference_cache_is_keyed_by_data_and_weights(tmp_path, monkeypatch):
    calls = []
    evaluate = refcache.evaluate_reference
    monkeypatch.setattr(refcache, "evaluate_reference",
                        lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    model, _ = loop.load_model(MODEL)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    data = tiny_data("paired", 8, 0, model.config.vocab_size)
    layout = loop.data_lib.LayoutConfig(kind="padded")

    def cached(d, p):
        return refcache.load_or_compute(str(tmp_path), d, layout, 4, graphdef, p, rest)

    first = cached(data, params)
    again = cached(data, params)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.values_t, again.values_t)
    cached(tiny_data("paired", 8, 1, model.config.vocab_size), params)
    assert len(calls) == 2, "other data must miss the cache"
    cached(data, jax.tree.map(lambda x: x * 1.01, params))
    assert len(calls) == 3, "other reference weights must miss the cache"
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 3

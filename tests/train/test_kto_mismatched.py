"""KTO's reference point from mismatched completions, scored by the engine in every layout.

The engine pairs example q's prompt with the next real example's completion (the last wraps)
on device; here each shifted pair is scored alone by a full forward pass in numpy, and z0 and
the KTO loss are recomputed from those values.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax import data as data_lib
from prefopt_jax.data.tokenized import from_lists
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models.transformer import Transformer
from prefopt_jax.train import build, optim, step as step_lib, tiny
from prefopt_jax.scoring import logps as logps_lib
from prefopt_jax.train.reference import ReferenceConfig
from prefopt_jax.train.state import policy_params

OPT = optim.OptimConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0)
LORA = lora_lib.LoraConfig(rank=2, alpha=4.0)
SLOTS, REAL, PAD = 8, 7, 48  # one filler slot; sequences padded to PAD for the full forward


def unpaired_data(seed: int, n: int = 16):
    """Random unpaired examples (K = 1), alternately desirable and undesirable."""
    rng = np.random.default_rng(seed)
    draw = lambda hi: rng.integers(1, tiny.VOCAB, int(rng.integers(2, hi))).tolist()  # noqa: E731
    prompts, completions = [draw(9) for _ in range(n)], [draw(11) for _ in range(n)]
    label = (np.arange(n) % 2 == 0).astype(np.float32)
    return from_lists("unpaired", 1, prompts, completions, np.arange(n), {"label": label})


def make_batch(data, layout: str, start: int = 0, min_shape=None) -> dict:
    """`REAL` examples from `start` and one filler slot, in a real layout."""
    kind = data_lib.LayoutConfig(kind=layout, row_length=64 if "packed" in layout else None)
    return data_lib.make_batch(data, np.arange(start, start + REAL), SLOTS, kind, min_shape)


def shifted(data, idx) -> list:
    """(prompt of example i, completion of the next example of the batch) for each example."""
    nxt = np.roll(idx, -1)
    return [(data.prompt(i).tolist(), data.completion(j, 0).tolist()) for i, j in zip(idx, nxt)]


def own(data, idx) -> list:
    return [(data.prompt(i).tolist(), data.completion(i, 0).tolist()) for i in idx]


@jax.jit
def _full_logps(graphdef, params, rest, tokens, segments):
    model = nnx.merge(graphdef, params, rest)
    positions = jnp.broadcast_to(jnp.arange(PAD), tokens.shape)
    logits = model(tokens, positions, segments).astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def seq_logps(graphdef, params, rest, seqs) -> np.ndarray:
    """Summed completion log-probs of each (prompt, completion), each scored alone (full logits)."""
    tokens = np.zeros((len(seqs), PAD), np.int32)
    segments = np.zeros((len(seqs), PAD), np.int32)
    for i, (p, c) in enumerate(seqs):
        tokens[i, :len(p) + len(c)] = p + c
        segments[i, :len(p) + len(c)] = 1
    logp = np.asarray(_full_logps(graphdef, params, rest, tokens, segments))
    return np.array([sum(logp[i, len(p) - 1 + t, tok] for t, tok in enumerate(c))
                     for i, (p, c) in enumerate(seqs)])


def kto_np(d_own, d_kl, label, beta=0.1):
    z0 = max(0.0, float(np.mean(d_kl)))
    loss = np.where(label > 0, 1 - 1 / (1 + np.exp(-beta * (d_own - z0))),
                    1 - 1 / (1 + np.exp(-beta * (z0 - d_own))))
    return float(np.mean(loss)), z0


def setup_state(ref_kind: str, batch_m, mesh_shape=(1, 1, 1)):
    """A kto step whose policy differs from its reference.

    LoRA: perturbed adapters; frozen: a perturbed reference, which makes the policy likelier
    than it on most sequences, so z0 > 0 and its clamp at 0 hides nothing.
    """
    mesh = sharding_lib.make_mesh(mesh_shape)
    lora = LORA if ref_kind == "lora" else None
    algo = build.AlgoConfig("kto", (), ReferenceConfig(kind=ref_kind))
    model = Transformer(tiny.config(num_layers=2), rngs=nnx.Rngs(0))
    setup, state, step_fn, batch_sh = build.build(model, algo, OPT, batch_m, mesh, lora=lora)
    field = "params" if lora else "ref"
    leaves, treedef = jax.tree.flatten(getattr(state, field))
    keys = jax.random.split(jax.random.key(5), len(leaves))
    noise = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    state = state.replace(**{field: jax.tree.unflatten(treedef, [x + n for x, n in
                                                                 zip(leaves, noise)])})
    return setup, state, step_fn, batch_sh, mesh


def policy_and_ref(setup, state):
    pol = jax.device_get(policy_params(setup, state))
    ref = jax.device_get(state.base if setup.lora is not None else state.ref)
    return pol, ref


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix", "prefix_packed"])
@pytest.mark.parametrize("ref_kind", ["frozen", "lora"])
def test_mismatched_logps_equal_full_forward_of_shifted_pairs(layout, ref_kind):
    data = unpaired_data(seed=1)
    batch = make_batch(data, layout)
    setup, state, _, _, mesh = setup_state(ref_kind, build.stack_micro([batch]))
    assert setup.mismatched
    with jax.set_mesh(mesh):
        pol_qc, ref_qc, mask_qc = jax.jit(
            lambda s, b: step_lib.mismatched_logps(setup, policy_params(setup, s), s, b)
        )(state, jax.tree.map(jnp.asarray, batch))
    mask_qc = np.asarray(mask_qc)
    got_pol = np.sum(np.where(mask_qc > 0, pol_qc, 0.0), axis=1)
    got_ref = np.sum(np.where(mask_qc > 0, ref_qc, 0.0), axis=1)
    pol, ref = policy_and_ref(setup, state)
    seqs = shifted(data, np.arange(REAL))
    np.testing.assert_allclose(got_pol[:REAL], seq_logps(setup.graphdef, pol, state.rest, seqs),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_ref[:REAL], seq_logps(setup.graphdef, ref, state.rest, seqs),
                               rtol=1e-5, atol=1e-4)
    assert np.all(mask_qc[REAL:] == 0)  # the filler slot scores nothing
    assert not np.allclose(got_pol, got_ref)


@pytest.mark.parametrize("micro", [1, 2])
def test_kto_step_loss_uses_z0_from_shifted_pairs(micro):
    """Loss and z0 of one step equal KTO computed directly; under accumulation z0 is per micro."""
    data = unpaired_data(seed=2)
    shape = data_lib.Shape(SLOTS, 32, 16)  # one shape for every micro-batch
    batches = [make_batch(data, "padded", REAL * m, shape) for m in range(micro)]
    setup, state, step_fn, batch_sh, mesh = setup_state("frozen", build.stack_micro(batches))
    pol, ref = policy_and_ref(setup, state)
    score = lambda params, seqs: seq_logps(setup.graphdef, params, state.rest, seqs)  # noqa: E731
    want_loss, want_z0 = [], []
    for m in range(micro):
        idx = np.arange(REAL * m, REAL * (m + 1))
        d_own = score(pol, own(data, idx)) - score(ref, own(data, idx))
        d_kl = score(pol, shifted(data, idx)) - score(ref, shifted(data, idx))
        loss, z0 = kto_np(d_own, d_kl, data.field("label")[idx])
        want_loss.append(loss)
        want_z0.append(z0)
    assert max(want_z0) > 0  # the clamp at 0 does not hide the value
    with jax.set_mesh(mesh):
        _, metrics = step_fn(state, jax.device_put(build.stack_micro(batches), batch_sh))
    metrics = jax.device_get(metrics)
    z0_sum, z0_count = metrics["kto/z0"]
    assert float(z0_count) == micro
    np.testing.assert_allclose(float(z0_sum) / micro, np.mean(want_z0), rtol=1e-4, atol=1e-5)
    loss_sum, count = metrics["loss"]
    np.testing.assert_allclose(float(loss_sum) / float(count), np.mean(want_loss), rtol=1e-5)


def test_sharded_kto_step_equals_single_device():
    data = unpaired_data(seed=3)
    batch_m = build.stack_micro([make_batch(data, "packed")])
    out = []
    for mesh_shape in [(1, 1, 1), (2, 2, 2)]:
        _, state, step_fn, batch_sh, mesh = setup_state("frozen", batch_m, mesh_shape)
        with jax.set_mesh(mesh):
            _, metrics = step_fn(state, jax.device_put(batch_m, batch_sh))
        out.append(jax.device_get(metrics))
    for key in ("loss", "kto/z0"):
        np.testing.assert_allclose(out[1][key], out[0][key], rtol=1e-5, atol=1e-6)
    assert float(out[0]["kto/z0"][0]) > 0


def test_explicit_z0_scores_no_mismatched_rows_and_is_not_coupled():
    graphdef = nnx.split(Transformer(tiny.CONFIG, rngs=nnx.Rngs(0)))[0]
    fixed = build.AlgoConfig("kto", {"z0": 0.0})
    assert not build.make_setup(graphdef, fixed, OPT).mismatched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build.check_accumulation(fixed.objective(), 2)
    with pytest.warns(UserWarning, match="per micro-batch.*z0"):
        build.check_accumulation(build.AlgoConfig("kto").objective(), 2)


def test_precomputed_reference_cannot_score_mismatched_rows():
    graphdef = nnx.split(Transformer(tiny.CONFIG, rngs=nnx.Rngs(0)))[0]
    cached = ReferenceConfig(kind="precomputed")
    with pytest.raises(ValueError, match="mismatched completions.*z0"):
        build.make_setup(graphdef, build.AlgoConfig("kto", (), cached), OPT)
    assert not build.make_setup(graphdef, build.AlgoConfig("kto", {"z0": 0.0}, cached),
                                OPT).mismatched


def test_rows_too_few_for_shared_prompts_are_reported():
    """Unpaired examples sharing one stored prompt (not a layout's output) can overflow the rows.

    One row: a 10-token prompt with four 1-token completions as branches; the four mismatched
    sequences need 44 tokens, the one mismatched row of 16 + 16 holds 32.
    """
    length, c = 16, 16
    batch = {k: np.zeros((1, length), np.int32)
             for k in ("tokens", "positions", "segment_ids", "branch_ids")}
    batch["tokens"][0, :14] = np.arange(1, 15)
    batch["positions"][0, :14] = list(range(10)) + [10] * 4
    batch["segment_ids"][0, :14] = 1
    batch["branch_ids"][0, 10:14] = np.arange(1, 5)
    batch["source_index"] = np.zeros((4, c), np.int32)
    batch["source_index"][:, 0] = 9
    batch["target_tokens"] = np.zeros((4, c), np.int32)
    batch["target_tokens"][:, 0] = np.arange(11, 15)
    batch["completion_mask"] = np.zeros((4, c), np.float32)
    batch["completion_mask"][:, 0] = 1
    batch["pair_valid"] = np.ones(4, np.float32)
    kl, fits = jax.jit(logps_lib.mismatched_batch)(batch)
    assert kl["tokens"].shape == (1, 32)
    np.testing.assert_array_equal(fits, [True, True, False, False])
    np.testing.assert_array_equal(kl["tokens"][0, :22], list(range(1, 11)) + [12]
                                  + list(range(1, 11)) + [13])

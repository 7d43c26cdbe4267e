"""The jitted train step: learns, any objective, every layout, accumulation, references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefopt_jax.models import sharding as sharding_lib
from prefopt_jax.models import lora as lora_lib
from prefopt_jax.models.transformer import Transformer
from prefopt_jax.train import build, optim, tiny
from prefopt_jax.train.reference import ReferenceConfig

OPT = optim.OptimConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0)


def numpy_batch(layout="padded", seed=0, m=1, **kw):
    return build.stack_micro([tiny.batch(layout, seed=seed + i, **kw) for i in range(m)])


def run(algo, layout="padded", steps=3, m=1, lora=None, mesh_shape=(1, 1, 1), opt=OPT, kw=None,
        batches=None, config=tiny.CONFIG):
    mesh = sharding_lib.make_mesh(mesh_shape)
    model = Transformer(config, rngs=nnx.Rngs(0))
    batches = batches or [numpy_batch(layout, seed=10 * i, m=m, **(kw or {})) for i in range(steps)]
    setup, state, step_fn, batch_sh = build.build(model, algo, opt, batches[0], mesh, lora=lora)
    out = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, metrics = step_fn(state, jax.device_put(b, batch_sh))
            out.append(jax.device_get(metrics))
    return state, out


def mean(metrics, key="loss"):
    s, c = metrics[key]
    return float(s) / max(float(c), 1.0)


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix"])
def test_dpo_loss_decreases_every_layout(layout):
    batch = numpy_batch(layout)
    _, out = run(build.AlgoConfig("dpo"), batches=[batch] * 4)
    losses = [mean(m) for m in out]
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)
    assert losses[-1] < losses[0]


def test_layouts_give_the_same_first_step():
    got = [mean(run(build.AlgoConfig("dpo"), layout=lay, steps=2)[1][1])
           for lay in ("padded", "packed", "prefix")]
    np.testing.assert_allclose(got, got[0], rtol=1e-4)


def test_accumulation_equals_one_big_batch():
    """Two micro-batches of 4 pairs (one filler) equal one batch of those 8 pairs."""
    micro = [tiny.batch("padded", seed=s, valid=3) for s in (1, 2)]
    big = {k: np.concatenate([b[k] for b in micro]) for k in micro[0]}
    rows = micro[0]["tokens"].shape[0] * micro[0]["tokens"].shape[1]
    big["source_index"] = np.concatenate([micro[0]["source_index"],
                                          micro[1]["source_index"] + rows])
    _, out_m = run(build.AlgoConfig("dpo"), batches=[build.stack_micro(micro)] * 2)
    _, out_b = run(build.AlgoConfig("dpo"), batches=[build.stack_micro([big])] * 2)
    for a, b in zip(out_m, out_b):
        assert float(a["loss"][1]) == 6.0
        np.testing.assert_allclose(mean(a), mean(b), rtol=1e-5)
        np.testing.assert_allclose(mean(a, "rewards/accuracy"), mean(b, "rewards/accuracy"))
        np.testing.assert_allclose(a["grad_norm"][0], b["grad_norm"][0], rtol=1e-4)


@pytest.mark.parametrize("loss,kind", [("simpo", "none"), ("bco", "frozen"), ("kto", "frozen"),
                                       ("bco_pair", "frozen")])
def test_registered_objectives_run(loss, kind):
    hyper = (("z0", 0.0),) if loss == "kto" else ()
    algo = build.AlgoConfig(loss, hyper, ReferenceConfig(kind=kind))
    state, out = run(algo, steps=2, kw={"unpaired": loss in ("bco", "kto")})
    assert all(np.isfinite(mean(m)) for m in out)
    if loss.startswith("bco"):
        assert float(state.loss_state["count"]) > 0


def test_lora_reference_trains_adapters_only():
    lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0)
    algo = build.AlgoConfig("dpo", (), ReferenceConfig(kind="lora"))
    state, out = run(algo, lora=lcfg)
    assert state.ref is None and state.base is not None
    assert mean(out[0]) == pytest.approx(np.log(2), abs=1e-6)
    assert mean(out[-1]) != mean(out[0])


def test_soft_update_moves_reference():
    algo = build.AlgoConfig("dpo", (), ReferenceConfig(soft_update_every=1,
                                                       soft_update_alpha=1.0))
    state, _ = run(algo, steps=2)
    for p, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ref)):
        np.testing.assert_allclose(p, r)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_optimizers_update_and_mask_decay(name):
    params = {"w_q": jnp.ones((4, 3)), "final_norm": {"scale": jnp.ones((4,))}}
    opt = optim.OptimConfig(name=name, learning_rate=1e-3, warmup_steps=1, total_steps=4,
                            weight_decay=0.5)
    tx = optim.build_optimizer(opt)
    grads = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(grads, state, params)
    # Zero gradients: only weight decay moves parameters, and never the norm scale.
    assert np.all(updates["final_norm"]["scale"] == 0)
    assert np.all(np.isfinite(updates["w_q"])) and np.any(updates["w_q"] != 0)


def test_schedule_warmup_then_decay():
    sched = optim.schedule(optim.OptimConfig(learning_rate=1.0, warmup_steps=2, total_steps=6,
                                             schedule="linear"))
    np.testing.assert_allclose([sched(i) for i in range(7)], [0, .5, 1, .75, .5, .25, 0])


def test_bf16_params_keep_float32_optimizer_state():
    config = tiny.config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    state, out = run(build.AlgoConfig("dpo"), config=config, batches=[numpy_batch()] * 3)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    losses = [mean(m) for m in out]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore:remat_policy=:UserWarning")  # numerics of unrolled remat
def test_remat_policy_gives_the_same_losses_and_updates():
    batches = [numpy_batch(seed=s) for s in (0, 10)]
    plain, out_plain = run(build.AlgoConfig("dpo"), batches=batches)
    remat, out_remat = run(build.AlgoConfig("dpo"), batches=batches,
                           config=tiny.config(remat_policy="full"))
    for a, b in zip(out_plain, out_remat):
        np.testing.assert_allclose(mean(a), mean(b), rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"][0], b["grad_norm"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(remat.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_coupled_objectives_under_accumulation():
    objective = lambda name: build.AlgoConfig(name).objective()  # noqa: E731
    build.check_accumulation(objective("aot"), 1)
    build.check_accumulation(objective("dpo"), 4)
    with pytest.raises(ValueError, match="sorts over the global batch"):
        build.check_accumulation(objective("aot"), 2)
    with pytest.warns(UserWarning, match="per micro-batch"):
        build.check_accumulation(objective("bco_pair"), 2)


@pytest.mark.parametrize("loss,hyper,kind,match", [
    ("grpo", {"group_size": 4}, "frozen", "online RL loop"),
    ("dpo", {}, "none", "needs a reference")])
def test_untrainable_choices_fail_before_any_compute(loss, hyper, kind, match):
    graphdef = nnx.split(Transformer(tiny.CONFIG, rngs=nnx.Rngs(0)))[0]
    with pytest.raises(ValueError, match=match):
        build.make_setup(graphdef, build.AlgoConfig(loss, hyper, ReferenceConfig(kind=kind)),
                         OPT)


def buffers(array) -> set[int]:
    return {shard.data.unsafe_buffer_pointer() for shard in array.addressable_shards}


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("lora", [None, lora_lib.LoraConfig(rank=2)], ids=["full", "lora"])
def test_donated_weights_are_taken_over_not_copied(lora, mesh_shape):
    """`donate=True`: on one device the state's weights live in the loaded model's buffers (no
    second copy) and the model's arrays are gone; resharded, the resharded copies are donated.
    Either way the state equals the one built without donation."""
    batch_m = numpy_batch()
    mesh = sharding_lib.make_mesh(mesh_shape)
    one_device = mesh.size == 1
    algo = build.AlgoConfig("dpo", (), ReferenceConfig(kind="lora" if lora else "frozen"))
    setup = None
    states = {}
    for donate in (False, True):
        model = Transformer(tiny.CONFIG, rngs=nnx.Rngs(0))
        graphdef, params, base, rest = build.split_model(model, lora, seed=0)
        weights = params if lora is None else base
        setup = setup or build.make_setup(graphdef, algo, OPT, lora)
        pointers = {path: buffers(var.get_value()) for path, var in nnx.to_flat_state(weights)}
        state, _ = build.place_state(setup, params, base, rest, batch_m, mesh, seed=0,
                                     donate=donate)
        held = state.params if lora is None else state.base
        shared = [path for path, var in nnx.to_flat_state(held)
                  if buffers(var.get_value()) & pointers[path]]
        deleted = [var.get_value().is_deleted() for _, var in nnx.to_flat_state(weights)]
        if donate and one_device:
            assert all(deleted) and len(shared) == len(pointers)
        else:
            assert not shared and not any(deleted)
        states[donate] = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(states[False]), jax.tree.leaves(states[True])):
        np.testing.assert_array_equal(a, b)

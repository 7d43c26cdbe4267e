"""The diffusion task on the shared driver: steps equal across layouts, trajectories, SePPO.

A step on a (2,2,2) mesh of 8 CPU devices equals the one-device step, and two micro-batches
equal one batch (each row draws its t and noise from the row's own key). Trajectory objectives
train on samples of the current policy: the sampler's step log-probs equal the step's own
recomputation (DDPO's ratio is 1, its approximate KL 0, at the first update), and the two
trajectories of a D3PO pair start from one noise. SePPO's reference is a snapshot of the
policy drawn from a pool that grows every `reference_every` steps, and its samples replace the
rejected images. Image rows with .npy/.npz references are read in every format and errors name
the file's line and the field. Every diffusion objective trains from its config in
tests/test_objectives.py; a SIGKILLed diffusion run resumes exactly in tests/train/
test_resume.py.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from prefopt_jax.data.formats import DataError
from prefopt_jax.diffusion import data as data_lib
from prefopt_jax.diffusion.spec import DiffusionModelSpec
from prefopt_jax.diffusion.train import DiffusionConfig, DiffusionTask, trajectory_inputs
from prefopt_jax.errors import ConfigError
from prefopt_jax.losses import ObjectiveError
from prefopt_jax.train import build, optim
from prefopt_jax.train.driver import to_host
from prefopt_jax.train.loop import LoopConfig
from prefopt_jax.train.reference import ReferenceConfig

MODEL = DiffusionModelSpec(source="tiny", num_timesteps=100)
CONFIG = DiffusionConfig(sample_steps=3, prompts_per_step=2, group_size=2, reference_every=1)


def task(loss, tmp_path, mesh=(1, 1, 1), batch_size=4, micro_batches=1, config=CONFIG,
         source="tiny", reference=ReferenceConfig(), optimizer="adamw"):
    algo = build.AlgoConfig(loss=loss, reference=reference)
    data = data_lib.ImageDataSpec(source=source, batch_size=batch_size,
                                  micro_batches=micro_batches, tiny_examples=8)
    loop = LoopConfig(steps=2, output_dir=str(tmp_path), mesh_shape=mesh)
    opt = optim.for_run(optim.OptimConfig(name=optimizer, learning_rate=1e-3, warmup_steps=0,
                                          schedule="constant"), 2)
    return DiffusionTask(MODEL, data, algo, opt, loop, config)


def run_steps(t, steps=1):
    values = []
    with jax.set_mesh(t.mesh):
        for number in range(1, steps + 1):
            values.append(t.step(number)[0])
    return values, [np.asarray(x) for x in jax.tree.leaves(to_host(t.state.params))]


@pytest.mark.parametrize("loss", ["diffusion_dpo", "ddpo"])
def test_sharded_step_equals_one_device(loss, tmp_path):
    # SGD: Adam's first step is lr * sign(g), which turns a gradient that is 0 on one device
    # and 1e-12 (reduction order) on eight into a difference of lr; SGD keeps it at 1e-15.
    one, params_one = run_steps(task(loss, tmp_path / "one", optimizer="sgd"), 2)
    sharded_task = task(loss, tmp_path / "eight", mesh=(2, 2, 2), optimizer="sgd")
    spread = max(len(x.sharding.device_set) for x in jax.tree.leaves(sharded_task.state.params))
    assert spread == 8
    eight, params_eight = run_steps(sharded_task, 2)
    for a, b in zip(params_one, params_eight):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for x, y in zip(one, eight):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-5), k


def test_two_micro_batches_equal_one_batch(tmp_path):
    _, whole = run_steps(task("diffusion_dpo", tmp_path / "a", optimizer="sgd"))
    _, split = run_steps(task("diffusion_dpo", tmp_path / "b", micro_batches=2, optimizer="sgd"))
    for a, b in zip(whole, split):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    initial = [np.asarray(x) for x in jax.tree.leaves(
        to_host(task("diffusion_dpo", tmp_path / "c").state.params))]
    changed = any(not np.allclose(a, b) for a, b in zip(whole, initial))
    assert changed


def test_trajectories_are_the_policy_samples_and_pairs_share_start_noise(tmp_path):
    t = task("ddpo", tmp_path)
    batch = t.next_batch(1, peek=False)
    xs_nshwc = batch["xs_nshwc"][0]
    assert xs_nshwc.shape == (4, 4, 8, 8, 1)  # 2 prompts x 2, S + 1 levels
    np.testing.assert_array_equal(xs_nshwc[0, 0], xs_nshwc[1, 0])  # one start noise per pair
    assert not np.array_equal(xs_nshwc[0, -1], xs_nshwc[1, -1])  # different chains
    assert not np.array_equal(xs_nshwc[0, 0], xs_nshwc[2, 0])
    np.testing.assert_array_equal(batch["label_n"][0][0::2], batch["label_n"][0][1::2])
    values, _ = run_steps(task("ddpo", tmp_path / "b"))
    # The sampler's log-probs are the ones the step recomputes: ratio 1 at the first update.
    assert values[0]["approx_kl"] < 1e-8
    assert values[0]["advantages/abs"] > 0.5


@pytest.mark.parametrize("per_pixel", [True, False])
def test_trajectory_log_probs_are_per_pixel_means_or_the_sampler_densities(per_pixel, tmp_path):
    # DDPO's and D3PO's released code averages each step's Gaussian log-prob over the pixels
    # (their clip ranges assume it); logp_per_pixel=False keeps the sampler's summed density.
    t = task("d3po", tmp_path, config=dataclasses.replace(CONFIG, logp_per_pixel=per_pixel))
    batch = {k: v[0] for k, v in t.next_batch(1).items() if k != "example_index"}
    with jax.set_mesh(t.mesh):
        inputs = trajectory_inputs(t.setup, t.model(), t.model(t.state.ref), batch)
    want = batch["old_logps_ns"] / (8 * 8 * 1 if per_pixel else 1)  # the sampler's, summed
    assert np.abs(batch["old_logps_ns"]).max() > 10.0  # a sum over 64 pixels, not a mean
    for got in (inputs.logps_ns, inputs.ref_logps_ns, inputs.old_logps_ns):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_seppo_draws_its_reference_from_policy_snapshots(tmp_path):
    t = task("seppo", tmp_path)
    initial = [np.asarray(x) for x in jax.tree.leaves(to_host(t.state.params))]
    data_rejected = t.loader.arrays["rejected_nhwc"]
    batch = t.next_batch(1, peek=True)
    # The rejected images are the reference's samples, not the data's.
    assert not any(np.allclose(batch["rejected_nhwc"][0][0], r) for r in data_rejected)
    pools = []
    with jax.set_mesh(t.mesh):
        for number in (1, 2, 3):
            t.step(number)
            aux = to_host(t.state.aux)
            pools.append(int(aux["count"]))
            ref = [np.asarray(x) for x in jax.tree.leaves(to_host(t.state.ref))]
            slots = [[leaf[i] for leaf in jax.tree.leaves(aux["pool"])]
                     for i in range(CONFIG.reference_pool)]
            assert any(all(np.array_equal(a, b) for a, b in zip(ref, slot)) for slot in slots)
    assert pools == [2, 3, 4]  # the initial model, then one snapshot per step
    first_slot = [leaf[0] for leaf in jax.tree.leaves(aux["pool"])]
    assert all(np.array_equal(a, b) for a, b in zip(first_slot, initial))


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ObjectiveError, match="objective 'dpo' reads pairwise inputs"):
        task("dpo", tmp_path)
    with pytest.raises(ObjectiveError, match="frozen copy as the reference.*not 'lora'"):
        task("diffusion_dpo", tmp_path, reference=ReferenceConfig(kind="lora"))
    with pytest.raises(ConfigError, match="group_size=3"):
        DiffusionConfig(group_size=3)
    with pytest.raises(ConfigError, match="trajectory objectives need step densities"):
        task("d3po", tmp_path, config=DiffusionConfig(sampler="ddim", eta=0.0))
    with pytest.raises(Exception, match="'digits' holds labelled images, not paired"):
        task("diffusion_dpo", tmp_path, source="digits")


# --- image rows -----------------------------------------------------------------------------

def write_rows(tmp_path, rows, name="rows"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.uniform(-1, 1, (3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "stack.npy", stack)
    np.save(tmp_path / "one.npy", stack[0][..., None])
    np.savez(tmp_path / "pairs.npz", chosen=stack, rejected=-stack)
    return stack


def test_rows_of_every_format_give_each_kind(tmp_path, image_files):
    stack = image_files
    rows = [{"prompt": 1, "chosen": "pairs.npz#chosen/0", "rejected": "pairs.npz#rejected/0"},
            {"prompt": "2", "completion": "stack.npy#1", "label": False},
            {"prompt": 3, "completions": ["stack.npy#0", "one.npy", "stack.npy#2"],
             "scores": [0.1, 0.9, 0.5]},
            {"prompt": 4, "image": "stack.npy#2"}]
    path = write_rows(tmp_path, rows)
    paired = data_lib.read_rows(write_rows(tmp_path, [rows[0], rows[2]], "p"), "paired", 10)
    np.testing.assert_array_equal(paired["label_n"], [1, 3])
    np.testing.assert_array_equal(paired["chosen_nhwc"][0, ..., 0], stack[0])
    np.testing.assert_array_equal(paired["rejected_nhwc"][0, ..., 0], -stack[0])
    # A ranked row gives its best (one.npy = stack[0]) against its worst (stack[0] at 0.1).
    np.testing.assert_array_equal(paired["chosen_nhwc"][1, ..., 0], stack[0])
    with pytest.raises(DataError, match="line 2: a row of format 'unpaired' .* holds no paired"):
        data_lib.read_rows(path, "paired", 10)
    unpaired = data_lib.read_rows(write_rows(tmp_path, rows[:2], "u"), "unpaired", 10)
    np.testing.assert_array_equal(unpaired["desirable_n"], [True, False, False])
    np.testing.assert_array_equal(unpaired["label_n"], [1, 1, 2])
    listwise = data_lib.read_rows(write_rows(tmp_path, [rows[0], rows[2]], "l"),
                                   "listwise", 10)
    assert listwise["images_nkhwc"].shape == (2, 3, 8, 8, 1)
    np.testing.assert_array_equal(listwise["item_valid_nk"], [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(listwise["scores_nk"][0], [1.0, 0.0, 0.0])
    # Images: the chosen one, none from an undesirable single, the list's best, the image.
    images = data_lib.read_rows(path, "images", 10)
    np.testing.assert_array_equal(images["label_n"], [1, 3, 4])
    np.testing.assert_array_equal(images["image_nhwc"][2, ..., 0], stack[2])


@pytest.mark.parametrize("row,message", [
    ({"prompt": 1, "chosen": "missing.npy", "rejected": "stack.npy#0"},
     "line 2, field 'chosen': cannot read image 'missing.npy'"),
    ({"prompt": 12, "image": "stack.npy#0"},
     "line 2, field 'prompt': expected a class label in \\[0, 10\\), got 12"),
    ({"prompt": 1, "chosen": "stack.npy", "rejected": "stack.npy#0"},
     "line 2, field 'chosen': image 'stack.npy' has shape \\(3, 8, 8\\); the earlier images "
     "have \\(8, 8, 1\\)"),
    ({"prompt": 1, "chosen": "pairs.npz", "rejected": "stack.npy#0"},
     "an .npz reference names an array"),
    ({"prompt": 1, "text": "a"}, "line 2: no image format matches the fields"),
])
def test_bad_rows_name_the_line_and_field(tmp_path, image_files, row, message):
    good = {"prompt": 0, "chosen": "stack.npy#0", "rejected": "stack.npy#1"}
    path = write_rows(tmp_path, [good, row])
    with pytest.raises(DataError, match=message):
        data_lib.read_rows(path, "paired", 10)


def test_loader_resumes_exactly_and_covers_every_example():
    arrays = {"label_n": np.arange(10, dtype=np.int32)}
    loader = data_lib.ImageLoader(arrays, 4, seed=3)
    first = [loader.next_batch()["example_index"] for _ in range(5)]
    assert sorted(np.concatenate(first)[:10]) == list(range(10))  # epoch 0 is a permutation
    again = data_lib.ImageLoader(arrays, 4, seed=3)
    again.load_state_dict({"position": 8})
    np.testing.assert_array_equal(again.next_batch()["example_index"], first[2])

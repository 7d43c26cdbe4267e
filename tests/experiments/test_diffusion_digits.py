"""experiments/diffusion_digits: the pairs built from a model's own samples rank by the reward,
and the diffusion data loader reads them back as pairs (DPO) and as labelled singles (KTO)."""

import importlib.util
import json
import pathlib

import numpy as np

from prefopt_jax.diffusion import data as data_lib
from prefopt_jax.diffusion import spec as spec_lib
from prefopt_jax.diffusion.rewards import stroke_contrast

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_run():
    spec = importlib.util.spec_from_file_location("diffusion_digits_run",
                                                  ROOT / "experiments/diffusion_digits/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_rank_by_reward_and_load_as_pairs_and_singles(tmp_path):
    run = load_run()
    model, schedule = spec_lib.load(spec_lib.DiffusionModelSpec(source="tiny", seed=3))
    spec_lib.save(model, schedule, str(tmp_path / "model"))
    calls = []

    def reward(images, labels):  # stroke contrast, checked against the rows below
        calls.append((images, labels))
        return stroke_contrast(images)

    summary = run.build_pairs(reward, str(tmp_path / "model"), str(tmp_path / "pairs"),
                              per_class=4, seed=0)
    images, labels = calls[0]
    classes = model.config.num_classes
    assert images.shape == (4 * classes, *model.image_shape)
    score = np.asarray(stroke_contrast(images))
    rows = [json.loads(line) for line in open(tmp_path / "pairs" / "pairs.jsonl")]
    assert summary["pairs"] == len(rows) == 2 * classes
    stored = np.load(tmp_path / "pairs" / "samples.npy")
    np.testing.assert_array_equal(stored, images)
    for c in range(classes):
        mine = [r for r in rows if r["prompt"] == c]
        index = lambda ref: int(ref.split("#")[1])  # noqa: E731
        w = [index(r["chosen"]) for r in mine]
        l_ = [index(r["rejected"]) for r in mine]
        assert all(labels[i] == c for i in w + l_)
        assert sorted(w + l_) == sorted(np.flatnonzero(labels == c).tolist())  # each once
        # the best half is chosen, the i-th best against the (i + 2)-th best
        assert min(score[w]) >= max(score[l_])
        assert all(score[a] >= score[b] for a, b in zip(w, l_))
    assert summary["chosen_alignment"] > summary["rejected_alignment"]

    source = data_lib.ImageDataSpec(source=str(tmp_path / "pairs" / "pairs.jsonl"))
    pairs = data_lib.load(source, "paired", model.image_shape, classes, 0)
    np.testing.assert_array_equal(pairs["chosen_nhwc"][0], images[index(rows[0]["chosen"])])
    np.testing.assert_array_equal(pairs["label_n"], [r["prompt"] for r in rows])
    singles = data_lib.load(source, "unpaired", model.image_shape, classes, 0)
    assert len(singles["label_n"]) == 2 * len(rows)
    good = np.asarray(singles["desirable_n"], bool)
    np.testing.assert_array_equal(singles["image_nhwc"][good], pairs["chosen_nhwc"])
    np.testing.assert_array_equal(singles["image_nhwc"][~good], pairs["rejected_nhwc"])

"""Digits data (prefopt_jax.diffusion.digits) and image rewards (prefopt_jax.diffusion.rewards).

References are independent of the code under test: ``jax.image.resize`` and the exact 2x2
average of a half-pixel bilinear doubling for the upsampling, ``scipy.linalg.sqrtm`` for the
Frechet distance, hand-computed values for the contrast score. One classifier is trained per
module (a few seconds) and shared.
"""

import collections
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from prefopt_jax.diffusion import digits, rewards
from prefopt_jax.diffusion.digits import load_digits, save_grid
from prefopt_jax.diffusion.rewards import (
    ClassifierFileError, class_alignment, class_logprob, frechet_distance, load_classifier,
    load_or_train_classifier, resolve_reward, save_classifier, stroke_contrast, train_classifier)
from prefopt_jax.errors import UserError

N_ALL = 1797


# load_digits

def test_splits_have_shape_range_and_partition_the_data():
    parts = {split: load_digits(16, split) for split in ("train", "heldout", "all")}
    for images_nhwc, labels_n in parts.values():
        assert images_nhwc.dtype == np.float32 and labels_n.dtype == np.int32
        assert images_nhwc.shape[1:] == (16, 16, 1) and len(images_nhwc) == len(labels_n)
        assert images_nhwc.min() == -1.0 and images_nhwc.max() == 1.0
    assert len(parts["all"][0]) == N_ALL
    assert len(parts["heldout"][0]) == pytest.approx(0.2 * N_ALL, abs=10)

    def keys(split):
        images_nhwc, labels_n = parts[split]
        return collections.Counter((x.tobytes(), int(y)) for x, y in zip(images_nhwc, labels_n))

    assert not set(keys("train")) & set(keys("heldout"))
    assert keys("train") + keys("heldout") == keys("all")
    # Stratified: every class keeps about a fifth of its images out.
    held = np.bincount(parts["heldout"][1], minlength=10)
    assert np.all(np.abs(held / np.bincount(parts["all"][1]) - 0.2) < 0.01)


def test_split_is_deterministic_under_seed():
    a, la = load_digits(8, "heldout", seed=3)
    b, lb = load_digits(8, "heldout", seed=3)
    c, _ = load_digits(8, "heldout", seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_size_8_is_the_source_scaled_to_minus_one_one():
    from sklearn.datasets import load_digits as sklearn_digits
    images_nhwc, labels_n = load_digits(8, "all")
    source = sklearn_digits()
    np.testing.assert_allclose(images_nhwc[..., 0], source.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels_n, source.target)


def test_upsampling_matches_jax_resize_and_the_bilinear_average():
    small_nhwc, _ = load_digits(8, "all")
    for size in (16, 24):
        big_nhwc, _ = load_digits(size, "all")
        ref = jax.image.resize(jnp.asarray(small_nhwc), (N_ALL, size, size, 1), "bilinear")
        np.testing.assert_allclose(big_nhwc, np.asarray(ref), atol=1e-5)
    # Doubling with half-pixel centres samples x[i -/+ 1/4]; the pair's mean is the 1-D filter
    # [1/8, 3/4, 1/8] (edge pixels repeated) applied to rows and to columns.
    big_nhwc, _ = load_digits(16, "all")
    average = big_nhwc[..., 0].reshape(N_ALL, 8, 2, 8, 2).mean((2, 4))
    x = np.pad(small_nhwc[..., 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = x[:, :-2] / 8 + 3 * x[:, 1:-1] / 4 + x[:, 2:] / 8
    expected = rows[:, :, :-2] / 8 + 3 * rows[:, :, 1:-1] / 4 + rows[:, :, 2:] / 8
    np.testing.assert_allclose(average, expected, atol=1e-5)
    # ... which is close to the original image: the upsampling keeps the digit in place.
    assert np.abs(average - small_nhwc[..., 0]).mean() < 0.2


def test_bad_arguments_name_the_culprit():
    with pytest.raises(UserError, match="size=12"):
        load_digits(12)
    with pytest.raises(UserError, match="'test'.*train, heldout, all"):
        load_digits(16, "test")
    with pytest.raises(UserError, match="heldout_fraction=1.5"):
        load_digits(16, "train", heldout_fraction=1.5)


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    digits._raw_digits.cache_clear()
    try:
        with pytest.raises(UserError, match="pip install scikit-learn"):
            load_digits(8, "all")
    finally:
        digits._raw_digits.cache_clear()


# save_grid

def test_save_grid_layout_and_pixel_values(tmp_path):
    images_nhwc = np.linspace(-1.2, 1.2, 10 * 4 * 6).reshape(10, 4, 6, 1)
    path = save_grid(images_nhwc, tmp_path / "sub" / "grid.png", nrow=4)
    decoded = np.asarray(Image.open(path))
    assert decoded.shape == (3 * (4 + 1) + 1, 4 * (6 + 1) + 1)  # 3 rows of 4, 1-pixel borders
    # Image 5 sits in row 1, column 1; values are clipped to [-1, 1] then mapped to 0..255.
    expected = np.round((np.clip(images_nhwc[5, ..., 0], -1, 1) + 1) * 127.5)
    np.testing.assert_array_equal(decoded[6:10, 8:14], expected)
    assert decoded[0, 0] == digits.GRID_PAD_VALUE


def test_save_grid_with_labels_adds_a_strip_per_row(tmp_path):
    images_nhwc, labels_n = load_digits(16, "heldout")
    path = save_grid(images_nhwc[:7], tmp_path / "grid.png", labels=labels_n[:7], scale=2)
    decoded = np.asarray(Image.open(path))
    assert decoded.shape == (3 * (32 + digits.LABEL_STRIP + 1) + 1, 3 * (32 + 1) + 1)
    assert decoded[1 + 32:1 + 32 + digits.LABEL_STRIP, 1:33].max() > 128  # text was drawn


# The classifier

@pytest.fixture(scope="module")
def classifier():
    images_nhwc, labels_n = load_digits(16, "train")
    return train_classifier(images_nhwc, labels_n, steps=300, seed=0)


@pytest.fixture(scope="module")
def heldout():
    return load_digits(16, "heldout")


def test_classifier_reaches_heldout_accuracy(classifier, heldout):
    images_nhwc, labels_n = heldout
    predicted_n = np.argmax(np.asarray(rewards.logits(classifier, images_nhwc)), -1)
    assert np.mean(predicted_n == labels_n) >= 0.9
    assert rewards.features(classifier, images_nhwc).shape == (len(labels_n), 64)


def test_noise_augmentation_keeps_noisy_images_recognisable(classifier, heldout):
    # Trained without the noise this reaches ~0.81 here, with it ~0.89.
    images_nhwc, labels_n = heldout
    noise = np.random.default_rng(1).standard_normal(images_nhwc.shape).astype(np.float32)
    assert rewards.accuracy(classifier, images_nhwc + 0.7 * noise, labels_n) >= 0.85


def test_training_is_deterministic_under_seed(heldout):
    images_nhwc, labels_n = heldout
    a, b, c = (train_classifier(images_nhwc, labels_n, steps=3, seed=seed) for seed in (1, 1, 2))
    logits_a, logits_b, logits_c = (np.asarray(rewards.logits(m, images_nhwc[:8]))
                                    for m in (a, b, c))
    np.testing.assert_array_equal(logits_a, logits_b)
    assert not np.allclose(logits_a, logits_c)


def test_save_load_round_trip(classifier, heldout, tmp_path):
    path = save_classifier(classifier, tmp_path / "clf.npz")
    loaded = load_classifier(path)
    x_nhwc = heldout[0][:32]
    np.testing.assert_array_equal(rewards.logits(loaded, x_nhwc),
                                  rewards.logits(classifier, x_nhwc))
    assert os.listdir(tmp_path) == ["clf.npz"]  # no temporary file left behind


def test_corrupt_or_mismatched_file_names_the_path(classifier, tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file at all")
    with pytest.raises(ClassifierFileError, match=str(corrupt)):
        load_classifier(corrupt)
    good = dict(np.load(save_classifier(classifier, tmp_path / "good.npz")))
    name = "param/hidden/kernel"
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, **{**good, name: good[name][..., :1]})
    with pytest.raises(ClassifierFileError, match=f"{mismatched}.*hidden/kernel has shape"):
        load_classifier(mismatched)
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{key: value for key, value in good.items() if key != name})
    with pytest.raises(ClassifierFileError, match=f"{missing}.*hidden/kernel"):
        load_classifier(missing)
    with pytest.raises(ClassifierFileError, match="no such file"):
        load_classifier(tmp_path / "absent.npz")


def test_load_or_train_trains_once_then_loads(classifier, heldout, tmp_path, monkeypatch):
    calls = []

    def fake_train(images_nhwc, labels_n, **kwargs):  # the real training is tested above
        calls.append(images_nhwc.shape)
        return classifier

    monkeypatch.setattr(rewards, "train_classifier", fake_train)
    path = tmp_path / "cache" / "clf.npz"
    first = load_or_train_classifier(path)
    second = load_or_train_classifier(path)
    assert calls == [load_digits(16, "train")[0].shape] and path.exists()
    x_nhwc = heldout[0][:8]
    np.testing.assert_array_equal(rewards.logits(first, x_nhwc), rewards.logits(second, x_nhwc))


# Rewards

def test_class_alignment_is_a_probability_that_prefers_the_true_label(classifier, heldout):
    images_nhwc, labels_n = heldout
    reward = class_alignment(classifier)
    per_label_kn = np.stack([np.asarray(reward(images_nhwc, np.full_like(labels_n, k)))
                             for k in range(10)])
    assert per_label_kn.dtype == np.float32 and np.all((per_label_kn >= 0) & (per_label_kn <= 1))
    np.testing.assert_allclose(per_label_kn.sum(0), 1.0, atol=1e-5)
    true_n = np.asarray(reward(images_nhwc, labels_n))
    wrong_n = np.asarray(reward(images_nhwc, (labels_n + 1) % 10))
    assert true_n.mean() > 0.8 > 0.1 > wrong_n.mean()
    np.testing.assert_allclose(np.exp(class_logprob(classifier)(images_nhwc, labels_n)), true_n,
                               rtol=1e-5)
    np.testing.assert_allclose(jax.jit(reward)(images_nhwc[:4], labels_n[:4]), true_n[:4],
                               rtol=1e-5)


def test_stroke_contrast_hand_computed():
    ramp = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) / 7.5 - 1.0  # -1 .. 1 in 15 steps
    flat = np.zeros((1, 4, 4, 1), np.float32)
    strokes = -np.ones((1, 4, 4, 1), np.float32)
    strokes[0, 1, :] = 1.0  # a white bar over exactly a quarter of the pixels
    scores = np.asarray(stroke_contrast(np.concatenate([ramp, flat, strokes]), np.zeros(3, int)))
    # Ramp: the top four values are 12..15 and the bottom four 0..3, on the scale /7.5.
    np.testing.assert_allclose(scores, [(13.5 - 1.5) / 7.5, 0.0, 2.0], rtol=1e-6)


# Frechet distance

def _reference_frechet(a, b):
    covmean = scipy.linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False) - 2 * covmean)


def test_frechet_distance_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    b = 0.5 * rng.standard_normal((250, 6)) @ rng.standard_normal((6, 6)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(_reference_frechet(a, b), rel=1e-7)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 0.0])
    # Same covariance, shifted mean: exactly the squared shift.
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-8)
    assert frechet_distance(a, a + 2 * shift) > frechet_distance(a, a + shift) > 0
    with pytest.raises(UserError, match=r"\(300, 6\) and \(4, 5\)"):
        frechet_distance(a, np.zeros((4, 5)))


def test_fid_like_is_small_between_splits_and_large_for_damaged_images(classifier, heldout):
    train_nhwc, _ = load_digits(16, "train")
    same = rewards.fid_like(classifier, train_nhwc, heldout[0])
    damaged = rewards.fid_like(classifier, train_nhwc, 0.5 * heldout[0] - 0.5)
    assert 0 < same < damaged / 10


# resolve_reward

def test_resolve_reward_specs(classifier, heldout, tmp_path, monkeypatch):
    assert resolve_reward("contrast") is stroke_contrast
    assert resolve_reward("prefopt_jax.diffusion.rewards:stroke_contrast") is stroke_contrast
    path = save_classifier(classifier, tmp_path / "env.npz")
    monkeypatch.setenv(rewards.CLASSIFIER_ENV, path)
    images_nhwc, labels_n = heldout[0][:16], heldout[1][:16]
    expected_n = np.asarray(class_alignment(classifier)(images_nhwc, labels_n))
    for spec in ("classifier", f"classifier:{path}"):
        np.testing.assert_allclose(resolve_reward(spec)(images_nhwc, labels_n), expected_n)
    logprob_n = resolve_reward("classifier_logprob")(images_nhwc, labels_n)
    np.testing.assert_allclose(np.exp(logprob_n), expected_n, rtol=1e-5)


def test_resolve_reward_refuses_unknown_specs():
    with pytest.raises(UserError, match="'aesthetic'.*contrast.*package.module:function"):
        resolve_reward("aesthetic")
    with pytest.raises(UserError, match="no_such_module"):
        resolve_reward("no_such_module:fn")
    with pytest.raises(UserError, match="not callable"):
        resolve_reward("prefopt_jax.diffusion.rewards:CLASSIFIER_ENV")


def test_default_classifier_path_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(rewards.CLASSIFIER_ENV, str(tmp_path / "x.npz"))
    assert rewards.default_classifier_path() == str(tmp_path / "x.npz")
    monkeypatch.delenv(rewards.CLASSIFIER_ENV)
    assert rewards.default_classifier_path() == os.path.expanduser(
        "~/.cache/prefopt_jax/digits_classifier.npz")

"""Rewards on images for diffusion preference studies, and a Frechet distance between samples.

A reward function has one signature, ``fn(images_nhwc, labels_n) -> rewards_n`` (float32),
images in [-1, 1] as ``prefopt_jax.diffusion.digits.load_digits`` returns them and labels the
classes the images were generated for:

- ``class_alignment(clf)``: p(label | image) under a small digit classifier, the "prompt
  alignment" reward; ``class_logprob(clf)`` is its log.
- ``stroke_contrast``: an aesthetic-style score that ignores labels (bright, crisp strokes on a
  dark ground).

``DigitClassifier`` is a two-convolution network whose 64-unit hidden layer doubles as the feature
space of ``fid_like`` (the Frechet distance between Gaussians fitted to two sets of features, as
FID does with Inception features). ``resolve_reward`` turns a config string into a function.

Shape letters (array-name suffixes):
    n  images         h, w  image height and width    c  channels
    f  features       k  classes
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from prefopt_jax.diffusion.digits import NUM_CLASSES, load_digits
from prefopt_jax.errors import ConfigError, UserError

CLASSIFIER_ENV = "PREFOPT_DIGITS_CLASSIFIER"
DEFAULT_CLASSIFIER_PATH = os.path.join("~", ".cache", "prefopt_jax", "digits_classifier.npz")
FORMAT_VERSION = 1


class ClassifierFileError(UserError, ValueError):
    """A saved classifier that cannot be read (corrupt, or parameters that do not fit)."""


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Shape of a ``DigitClassifier``: square single-channel images of side ``size`` (a multiple
    of 4), two stride-2 3x3 convolutions of ``channels`` maps, ``features`` hidden units."""

    size: int = 16
    channels: tuple[int, int] = (16, 32)
    features: int = 64
    num_classes: int = NUM_CLASSES

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.size % 4 or len(self.channels) != 2:
            raise ConfigError(f"classifier size={self.size} must be a multiple of 4 and "
                              f"channels={self.channels} two numbers")

    def to_json(self) -> str:
        """The config and the file format version as JSON."""
        return json.dumps({**dataclasses.asdict(self), "version": FORMAT_VERSION})


class DigitClassifier(nnx.Module):
    """A small CNN on ``[N, size, size, 1]`` images: conv-relu, conv-relu, dense-relu (the
    features), dense (the logits)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig(), *, rngs: nnx.Rngs):
        c1, c2 = config.channels
        self.config = config
        self.conv1 = nnx.Conv(1, c1, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.hidden = nnx.Linear(c2 * (config.size // 4) ** 2, config.features, rngs=rngs)
        self.head = nnx.Linear(config.features, config.num_classes, rngs=rngs)

    def features(self, x_nhwc: jax.Array) -> jax.Array:
        """Hidden features ``[N, F]`` (after the ReLU)."""
        size = self.config.size
        if tuple(x_nhwc.shape[1:]) != (size, size, 1):
            raise ConfigError(f"DigitClassifier expects images [N, {size}, {size}, 1], "
                              f"got {tuple(x_nhwc.shape)}")
        h = jax.nn.relu(self.conv1(jnp.asarray(x_nhwc, jnp.float32)))
        h = jax.nn.relu(self.conv2(h))
        return jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))

    def __call__(self, x_nhwc: jax.Array) -> jax.Array:
        """Logits ``[N, K]``."""
        return self.head(self.features(x_nhwc))


def _abstract(config: ClassifierConfig) -> DigitClassifier:
    return nnx.eval_shape(lambda: DigitClassifier(config, rngs=nnx.Rngs(0)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, x_nhwc):
    return nnx.merge(graphdef, state)(x_nhwc)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _features(graphdef, state, x_nhwc):
    return nnx.merge(graphdef, state).features(x_nhwc)


def logits(clf: DigitClassifier, images_nhwc) -> jax.Array:
    """The classifier's logits ``[N, K]``, jitted."""
    return _logits(*nnx.split(clf), images_nhwc)


def features(clf: DigitClassifier, images_nhwc) -> np.ndarray:
    """The classifier's features ``[N, F]`` as float64 numpy, jitted."""
    return np.asarray(_features(*nnx.split(clf), images_nhwc), np.float64)


def accuracy(clf: DigitClassifier, images_nhwc, labels_n) -> float:
    """Share of images whose most likely class is their label."""
    predicted_n = np.asarray(jnp.argmax(logits(clf, images_nhwc), -1))
    return float(np.mean(predicted_n == np.asarray(labels_n)))


# Training. Randomness is drawn with numpy and every step is one small jitted call: on CPU a
# jax PRNG costs seconds of compilation and a scanned loop of convolutions runs ~10x slower.

def init_state(config: ClassifierConfig, rng: np.random.Generator):
    """``(graphdef, state)`` of a fresh classifier: LeCun-normal kernels, zero biases."""
    graphdef, state = nnx.split(_abstract(config))
    leaves, treedef = jax.tree.flatten(state)
    new = [jnp.zeros(leaf.shape, leaf.dtype) if len(leaf.shape) == 1 else
           jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])),
                       leaf.dtype) for leaf in leaves]
    return graphdef, jax.tree.unflatten(treedef, new)


def augment(x_nhwc: np.ndarray, rng: np.random.Generator, max_shift: int = 1,
            max_noise: float = 0.5) -> np.ndarray:
    """Shift each image by up to ``max_shift`` pixels (filling with the dark ground, -1) and add
    Gaussian noise of a per-image scale drawn from U(0, max_noise)."""
    n, h, w, _ = x_nhwc.shape
    s = max_shift
    padded = np.pad(x_nhwc, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
    dy_n, dx_n = rng.integers(0, 2 * s + 1, (2, n))
    rows_nh = dy_n[:, None] + np.arange(h)
    cols_nw = dx_n[:, None] + np.arange(w)
    shifted = padded[np.arange(n)[:, None, None], rows_nh[:, :, None], cols_nw[:, None, :]]
    scale_n = max_noise * rng.uniform(size=n)
    noise = rng.standard_normal(x_nhwc.shape, dtype=np.float32)
    return (shifted + scale_n[:, None, None, None] * noise).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(1, 2))
def _train_step(graphdef, state, opt_state, x_bhwc, labels_b, *, tx):
    def loss(state):
        logits_bk = nnx.merge(graphdef, state)(x_bhwc)
        return optax.softmax_cross_entropy_with_integer_labels(logits_bk, labels_b).mean()

    value, grads = jax.value_and_grad(loss)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, value


def train_classifier(images_nhwc, labels_n, *, steps: int = 500, seed: int = 0,
                     batch_size: int = 128, learning_rate: float = 3e-3,
                     max_noise: float = 0.5) -> DigitClassifier:
    """Train a ``DigitClassifier`` with adam (cosine-decayed rate) on noisy, shifted copies.

    The noise (a per-image scale from U(0, ``max_noise``)) and one-pixel shifts keep its outputs
    sensible on imperfect generated samples. Deterministic under ``seed``.
    """
    images_nhwc = np.asarray(images_nhwc, np.float32)
    labels_n = np.asarray(labels_n, np.int32)
    rng = np.random.default_rng(seed)
    graphdef, state = init_state(ClassifierConfig(size=int(images_nhwc.shape[1])), rng)
    tx = _adam(learning_rate, steps)
    opt_state = tx.init(state)
    for _ in range(steps):
        index_b = rng.integers(0, len(images_nhwc), batch_size)
        x_bhwc = augment(images_nhwc[index_b], rng, max_noise=max_noise)
        state, opt_state, _ = _train_step(graphdef, state, opt_state, x_bhwc, labels_n[index_b],
                                          tx=tx)
    return nnx.merge(graphdef, state)


@functools.cache
def _adam(learning_rate: float, steps: int):
    # Cached so that equal settings give the same (hashable) transformation: one compile.
    return optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))


# Saving and loading: one .npz of the parameters (by tree path) plus the config as JSON.

def _named_arrays(state) -> dict[str, np.ndarray]:
    """``{"conv1/kernel": array, ...}`` of a state."""
    return {name: np.asarray(leaf) for name, leaf in
            traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/").items()}


def save_classifier(clf: DigitClassifier, path) -> str:
    """Write the classifier to ``path`` (.npz: ``config`` JSON and one array per parameter)."""
    arrays = {f"param/{name}": leaf
              for name, leaf in _named_arrays(nnx.state(clf, nnx.Param)).items()}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # A temporary file in the same directory, then a rename: readers never see half a file.
    fd, tmp = tempfile.mkstemp(prefix=".digits_classifier.", suffix=".npz.tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, config=np.asarray(clf.config.to_json()), **arrays)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shared cache unreadable to others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return str(path)


def _read_config(data, path) -> ClassifierConfig:
    try:
        fields = json.loads(str(data["config"]))
        version = fields.pop("version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"format version {version}, expected {FORMAT_VERSION}")
        return ClassifierConfig(**fields)
    except (KeyError, TypeError, ValueError) as err:
        raise ClassifierFileError(f"digit classifier {path}: bad config ({err})") from None


def load_classifier(path) -> DigitClassifier:
    """Read a classifier written by ``save_classifier``; a file that cannot be read or whose
    parameters do not fit its config raises ``ClassifierFileError`` naming the path."""
    try:
        with np.load(path, allow_pickle=False) as data:
            config = _read_config(data, path)
            arrays = {key[len("param/"):]: data[key] for key in data.files if key != "config"}
    except ClassifierFileError:
        raise
    except FileNotFoundError:
        raise ClassifierFileError(f"digit classifier {path}: no such file") from None
    except Exception as err:  # np.load raises many kinds on a damaged file
        raise ClassifierFileError(f"digit classifier {path} is unreadable "
                                  f"({type(err).__name__}: {err})") from None
    graphdef, state = nnx.split(_abstract(config))
    expected = {name: leaf.shape for name, leaf in
                traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/").items()}
    if set(arrays) != set(expected):
        raise ClassifierFileError(f"digit classifier {path}: parameters "
                                  f"{sorted(set(arrays) ^ set(expected))} missing or unexpected")
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ClassifierFileError(f"digit classifier {path}: parameter {name} has shape "
                                      f"{arrays[name].shape}, expected {shape}")
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
        {name: jnp.asarray(value, jnp.float32) for name, value in arrays.items()}, sep="/"))
    return nnx.merge(graphdef, state)


def default_classifier_path() -> str:
    """``$PREFOPT_DIGITS_CLASSIFIER``, else ``~/.cache/prefopt_jax/digits_classifier.npz``."""
    return os.path.expanduser(os.environ.get(CLASSIFIER_ENV) or DEFAULT_CLASSIFIER_PATH)


def load_or_train_classifier(path=None, seed: int = 0) -> DigitClassifier:
    """Load the classifier at ``path`` (default ``default_classifier_path()``) if the file
    exists, else train one on ``load_digits(split="train")`` and save it there."""
    path = default_classifier_path() if path is None else os.path.expanduser(str(path))
    if os.path.exists(path):
        return load_classifier(path)
    images_nhwc, labels_n = load_digits(ClassifierConfig().size, split="train")
    clf = train_classifier(images_nhwc, labels_n, seed=seed)
    save_classifier(clf, path)
    return clf


# Rewards: fn(images_nhwc, labels_n) -> rewards_n.

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _label_logprob(graphdef, state, x_nhwc, labels_n):
    logp_nk = jax.nn.log_softmax(nnx.merge(graphdef, state)(x_nhwc).astype(jnp.float32))
    return jnp.take_along_axis(logp_nk, jnp.asarray(labels_n, jnp.int32)[:, None], 1)[:, 0]


def class_logprob(clf: DigitClassifier) -> Callable:
    """The reward ``log p(label | image)`` under ``clf`` (at most 0)."""
    graphdef, state = nnx.split(clf)

    def reward(images_nhwc, labels_n):
        return _label_logprob(graphdef, state, images_nhwc, labels_n)

    reward.__name__ = "class_logprob"
    return reward


def class_alignment(clf: DigitClassifier) -> Callable:
    """The "prompt alignment" reward ``p(label | image)`` under ``clf``, in [0, 1]."""
    logprob = class_logprob(clf)

    def reward(images_nhwc, labels_n):
        return jnp.exp(logprob(images_nhwc, labels_n))

    reward.__name__ = "class_alignment"
    return reward


def stroke_contrast(images_nhwc, labels_n=None) -> jax.Array:
    """Per image, the mean of its brightest quarter of pixel values minus the mean of its
    darkest quarter (``k = max(1, H*W*C // 4)`` values each); labels are ignored.

    In [0, 2] for images in [-1, 1]: 0 for a flat image, 2 for crisp white strokes covering at
    least a quarter of a black ground. Unlike the distance from mid-grey it cannot be maximised
    by a blank image.
    """
    x = jnp.asarray(images_nhwc, jnp.float32)
    sorted_np = jnp.sort(x.reshape(x.shape[0], -1), axis=1)
    k = max(1, sorted_np.shape[1] // 4)
    return sorted_np[:, -k:].mean(1) - sorted_np[:, :k].mean(1)


# A Frechet distance between feature sets (FID's formula on the classifier's features).

def frechet_distance(feats_a_nf, feats_b_nf) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of Gaussians fitted to two
    feature sets, in float64.

    ``Tr((S_a S_b)^(1/2))`` is the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum), so no complex matrix square root is
    needed; rounding's tiny negative eigenvalues are clipped to 0.
    """
    a, b = np.asarray(feats_a_nf, np.float64), np.asarray(feats_b_nf, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ConfigError(f"frechet_distance needs two [N >= 2, F] feature sets of one width, got "
                          f"{a.shape} and {b.shape}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_a = _psd_sqrt(cov_a)
    eig = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    mean_term = np.sum(np.square(a.mean(0) - b.mean(0)))
    return float(max(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt, 0.0))


def _psd_sqrt(cov_ff: np.ndarray) -> np.ndarray:
    """The symmetric square root of a PSD matrix (eigenvalues clipped at 0)."""
    eig, vec = np.linalg.eigh((cov_ff + cov_ff.T) / 2)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def fid_like(clf: DigitClassifier, images_a_nhwc, images_b_nhwc) -> float:
    """The Frechet distance between two image sets in ``clf``'s feature space."""
    return frechet_distance(features(clf, images_a_nhwc), features(clf, images_b_nhwc))


# Config strings.

REWARD_SPECS = ("classifier", "classifier:PATH", "classifier_logprob", "classifier_logprob:PATH",
                "contrast", "package.module:function")


def resolve_reward(spec: str) -> Callable:
    """The reward function a config string names.

    ``classifier[:PATH]``: ``class_alignment`` with ``load_or_train_classifier(PATH)`` (default
    ``default_classifier_path()``); ``classifier_logprob[:PATH]`` likewise with
    ``class_logprob``; ``contrast``: ``stroke_contrast``; ``package.module:function``: any
    importable callable ``fn(images_nhwc, labels_n) -> rewards_n``.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"reward {spec!r} must be a string; choices: {', '.join(REWARD_SPECS)}")
    name, sep, rest = spec.partition(":")
    if name in ("classifier", "classifier_logprob"):
        factory = class_alignment if name == "classifier" else class_logprob
        return factory(load_or_train_classifier(rest if sep and rest else None))
    if spec == "contrast":
        return stroke_contrast
    if not sep or not name or not rest:
        raise ConfigError(f"unknown reward {spec!r}; choices: {', '.join(REWARD_SPECS)}")
    try:
        fn = getattr(importlib.import_module(name), rest)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward {spec!r}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"reward {spec!r} is not callable")
    return fn

"""Image data for diffusion training: rows with image references, built-in sources, one loader.

Rows follow the language-model conventions (`data.formats`), with an image reference where a
completion would be text, and the class label as the prompt:

  images    {"prompt": 3, "image": REF}                                 (pre-training)
  paired    {"prompt": 3, "chosen": REF, "rejected": REF}
  unpaired  {"prompt": 3, "completion": REF, "label": true}
  ranked    {"prompt": 3, "completions": [REF, ...], "scores": [0.9, ...]}

A reference `REF` names a `.npy` or `.npz` file relative to the data file's folder: `x.npy` (the
whole array is one image), `x.npy#17` (row 17 of a stack), `x.npz#name` or `x.npz#name/17`.
Images are `[H, W]` or `[H, W, C]` floats in [-1, 1]. Each objective's inputs take what they
need from any format that holds it (TRL's conventions): pairs give the chosen image to
pre-training, both sides as desirable / undesirable to Diffusion-KTO and a list of two to
RankDPO; a ranked row gives its best and worst as a pair.

Built-in sources: `tiny` (synthetic: the chosen image of a pair is brighter than the rejected
one, for tests and smoke runs) and `digits` (scikit-learn's handwritten digits, images only).
An `.npz` file of the data kind's arrays (`KINDS`: e.g. `chosen_nhwc`, `rejected_nhwc`,
`label_n`) is read as it is, for data made by a program.

The `ImageLoader` draws batches from an endless stream of per-epoch permutations of the
examples; its position is one integer, so resuming is exact. Every host draws the same global
batch and gives its devices their rows.

Shape letters: `n` examples, `k` list items, `b` batch rows, `h`, `w`, `c` image axes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from prefopt_jax.data import open_source
from prefopt_jax.data.formats import DataError
from prefopt_jax.errors import ConfigError, DataSourceError

# What each objective inputs kind reads, and the arrays of that data kind.
KINDS = {"images": ("image_nhwc", "label_n"),
         "paired": ("chosen_nhwc", "rejected_nhwc", "label_n"),
         "unpaired": ("image_nhwc", "desirable_n", "label_n"),
         "listwise": ("images_nkhwc", "scores_nk", "item_valid_nk", "label_n"),
         "prompts": ("label_n",)}
DATA_OF_INPUTS = {"images": "images", "denoising": "paired", "denoising_unpaired": "unpaired",
                  "denoising_list": "listwise", "trajectory": "prompts"}
FORMATS = {"images": ("prompt", "image"), "paired": ("prompt", "chosen", "rejected"),
           "unpaired": ("prompt", "completion", "label"),
           "ranked": ("prompt", "completions", "scores")}


@dataclasses.dataclass(frozen=True)
class ImageDataSpec:
    """Where the images come from and how they are batched (gin: `ImageDataSpec`).

    Attributes:
      source: "tiny", "digits", or a JSON/JSONL file of rows (module docstring).
      batch_size: examples per optimiser step over all hosts (pairs, lists, images; for
        trajectory objectives see `DiffusionConfig.samples_per_step`).
      micro_batches: gradient-accumulation micro-batches per step (divides batch_size).
      tiny_examples: rows of the synthetic `tiny` source.
    """

    source: str = "tiny"
    batch_size: int = 8
    micro_batches: int = 1
    tiny_examples: int = 8

    def __post_init__(self):
        if self.batch_size < 1 or self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ConfigError(f"ImageDataSpec: micro_batches={self.micro_batches} must divide "
                              f"batch_size={self.batch_size} (both >= 1)")


# --- reading rows ---------------------------------------------------------------------------

class ImageFiles:
    """Opens each referenced file once and returns the images it names."""

    def __init__(self, folder: str):
        self.folder, self._open, self.shape = folder, {}, None

    def image(self, ref: Any, row: int, field: str) -> np.ndarray:
        """The image `ref` names, float32 `[H, W, C]`."""
        if not isinstance(ref, str) or not ref:
            raise DataError(row, field, f"expected an image reference (x.npy, x.npy#ROW, "
                            f"x.npz#NAME or x.npz#NAME/ROW), got {ref!r}")
        path, _, inner = ref.partition("#")
        full = os.path.join(self.folder, path)
        try:
            array = self._array(full, path, inner)
        except (OSError, ValueError, KeyError, IndexError) as err:
            raise DataError(row, field, f"cannot read image {ref!r}: {err}") from None
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or not np.issubdtype(array.dtype, np.number):
            raise DataError(row, field, f"image {ref!r} has shape {array.shape} ({array.dtype}); "
                            "expected [H, W] or [H, W, C] numbers")
        array = array.astype(np.float32)
        if self.shape is not None and array.shape != self.shape:
            raise DataError(row, field, f"image {ref!r} has shape {array.shape}; the earlier "
                            f"images have {self.shape}")
        self.shape = array.shape
        if not np.all(np.isfinite(array)):
            raise DataError(row, field, f"image {ref!r} has non-finite values")
        return array

    def _array(self, full: str, path: str, inner: str) -> np.ndarray:
        if full not in self._open:
            if not path.endswith((".npy", ".npz")):
                raise ValueError("not a .npy or .npz file")
            self._open[full] = np.load(full, allow_pickle=False)
        data = self._open[full]
        name, _, index = inner.partition("/") if path.endswith(".npz") else ("", "", inner)
        if path.endswith(".npz"):
            if not name:
                raise ValueError(f"an .npz reference names an array: one of {list(data.keys())}")
            data = data[name]
        return data if not index else data[int(index)]


def row_format(row: dict, index: int) -> str:
    """The format of a row (module docstring), from its fields."""
    if not isinstance(row, dict):
        raise DataError(index, None, f"expected a JSON object, got {type(row).__name__}")
    for name, fields in FORMATS.items():
        if all(row.get(f) is not None for f in fields):
            return name
    raise DataError(index, None, "no image format matches the fields "
                    f"{sorted(row)}; expected one of "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items()))


def label_of(row: dict, index: int, num_classes: int) -> int:
    """The class label a row's prompt names (an int or a numeric string)."""
    value = row["prompt"]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_classes:
        raise DataError(index, "prompt", f"expected a class label in [0, {num_classes}), got "
                        f"{value!r}")
    return value


def convert(fmt: str, row: dict, index: int, kind: str, files: ImageFiles) -> dict | None:
    """One example of data kind `kind` from a row of format `fmt` (arrays without the label).

    Returns None when the row holds nothing for that kind (an undesirable image is no
    pre-training example); raises when the format cannot give the kind at all.
    """
    img = lambda field: files.image(row[field], index, field)  # noqa: E731
    if kind == "prompts":
        return {}
    if fmt == "ranked":
        scores = [_score(s, index, i) for i, s in enumerate(row["scores"])]
        refs = row["completions"]
        if not isinstance(refs, list) or len(refs) != len(scores) or len(refs) < 2:
            raise DataError(index, "completions", "a ranked row needs a list of at least 2 "
                            "images, one per score")
        images = [files.image(r, index, f"completions[{i}]") for i, r in enumerate(refs)]
        order = np.argsort(-np.asarray(scores), kind="stable")
        if kind == "listwise":
            return {"images": images, "scores": scores}
        if kind == "paired":
            return {"chosen": images[order[0]], "rejected": images[order[-1]]}
        if kind == "images":
            return {"image": images[order[0]]}
    if fmt == "images" and kind == "images":
        return {"image": img("image")}
    if fmt == "paired":
        if kind == "paired":
            return {"chosen": img("chosen"), "rejected": img("rejected")}
        if kind == "images":
            return {"image": img("chosen")}
        if kind == "listwise":
            return {"images": [img("chosen"), img("rejected")], "scores": [1.0, 0.0]}
        if kind == "unpaired":  # both sides, as TRL turns pairs into KTO data
            return {"split": [(img("chosen"), True), (img("rejected"), False)]}
    if fmt == "unpaired":
        good = row["label"]
        if not isinstance(good, bool):
            raise DataError(index, "label", f"expected true or false, got {good!r}")
        if kind == "unpaired":
            return {"split": [(img("completion"), good)]}
        if kind == "images":
            return {"image": img("completion")} if good else None
    raise DataError(index, None, f"a row of format {fmt!r} ({', '.join(FORMATS[fmt])}) holds no "
                    f"{kind} examples")


def _score(value, index: int, i: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(index, f"scores[{i}]", f"expected a finite number, got {value!r}")
    return float(value)


def read_rows(path: str, kind: str, num_classes: int) -> dict[str, np.ndarray]:
    """The arrays of data kind `kind` (`KINDS`) from a JSON/JSONL file of image rows."""
    if not os.path.exists(path):
        raise DataSourceError(f"image data {path!r}: no such file (ImageDataSpec.source: "
                              "'tiny', 'digits' or a JSON/JSONL file)")
    source = open_source(path)
    files = ImageFiles(os.path.dirname(os.path.abspath(path)))
    examples = []
    for index, row in enumerate(source.rows(0, len(source))):
        try:
            fmt = row_format(row, index)
            label = label_of(row, index, num_classes)
            example = convert(fmt, row, index, kind, files)
        except DataError as err:
            raise err.located(source) from None
        for one in _split(example):
            examples.append(dict(one, label=label, row=index))
    if not examples:
        raise DataSourceError(f"image data {path!r}: no {kind} examples")
    return stack(examples, kind)


def _split(example: dict | None) -> list[dict]:
    if example is None:
        return []
    if "split" in example:
        return [{"image": image, "desirable": good} for image, good in example["split"]]
    return [example]


def stack(examples: list[dict], kind: str) -> dict[str, np.ndarray]:
    """Arrays of one kind from per-example dicts of equal-shape images (lists padded to the
    longest)."""
    out = {"label_n": np.asarray([e["label"] for e in examples], np.int32)}
    if kind == "images":
        out["image_nhwc"] = np.stack([e["image"] for e in examples])
    elif kind == "paired":
        out["chosen_nhwc"] = np.stack([e["chosen"] for e in examples])
        out["rejected_nhwc"] = np.stack([e["rejected"] for e in examples])
    elif kind == "unpaired":
        out["image_nhwc"] = np.stack([e["image"] for e in examples])
        out["desirable_n"] = np.asarray([e["desirable"] for e in examples], bool)
    elif kind == "listwise":
        k = max(len(e["images"]) for e in examples)
        shape = examples[0]["images"][0].shape
        out["images_nkhwc"] = np.zeros((len(examples), k, *shape), np.float32)
        out["scores_nk"] = np.zeros((len(examples), k), np.float32)
        out["item_valid_nk"] = np.zeros((len(examples), k), np.float32)
        for i, e in enumerate(examples):
            m = len(e["images"])
            out["images_nkhwc"][i, :m] = np.stack(e["images"])
            out["scores_nk"][i, :m] = e["scores"]
            out["item_valid_nk"][i, :m] = 1.0
    return out


def read_arrays(path: str, kind: str, num_classes: int) -> dict[str, np.ndarray]:
    """The arrays of data kind `kind` from an `.npz` file holding them by their `KINDS` names."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in KINDS[kind] if k not in data.files]
            if missing:
                raise DataSourceError(f"image data {path!r}: no array {missing[0]!r} (the "
                                      f"{kind} arrays: {', '.join(KINDS[kind])})")
            arrays = {k: np.asarray(data[k]) for k in KINDS[kind]}
    except (OSError, ValueError) as err:
        raise DataSourceError(f"image data {path!r}: cannot read ({err})") from None
    counts = {k: len(v) for k, v in arrays.items()}
    labels = arrays["label_n"]
    if len(set(counts.values())) != 1 or labels.min() < 0 or labels.max() >= num_classes:
        raise DataSourceError(f"image data {path!r}: arrays of lengths {counts}, labels in "
                              f"[{labels.min()}, {labels.max()}]; need equal lengths and labels "
                              f"in [0, {num_classes})")
    return {k: v.astype(np.float32) if k.endswith(("hwc", "_nk")) else v
            for k, v in arrays.items()}


# --- built-in sources -----------------------------------------------------------------------

def tiny_data(kind: str, count: int, image_shape: tuple[int, int, int], num_classes: int,
              seed: int, list_size: int = 3) -> dict[str, np.ndarray]:
    """Synthetic examples: noise around a level that sets the preference (brighter is better)."""
    rng = np.random.default_rng(seed)
    noise = lambda *lead: rng.normal(0.0, 0.3, (*lead, *image_shape)).astype(np.float32)  # noqa
    out = {"label_n": (np.arange(count) % num_classes).astype(np.int32)}
    if kind == "images":
        out["image_nhwc"] = np.clip(noise(count) + 0.5, -1, 1)
    elif kind == "paired":
        out["chosen_nhwc"] = np.clip(noise(count) + 0.5, -1, 1)
        out["rejected_nhwc"] = np.clip(noise(count) - 0.5, -1, 1)
    elif kind == "unpaired":
        good = np.arange(count) % 2 == 0
        out["image_nhwc"] = np.clip(noise(count) + np.where(good, 0.5, -0.5)[:, None, None, None],
                                    -1, 1)
        out["desirable_n"] = good
    elif kind == "listwise":
        levels = np.linspace(0.5, -0.5, list_size, dtype=np.float32)
        out["images_nkhwc"] = np.clip(noise(count, list_size)
                                      + levels[None, :, None, None, None], -1, 1)
        out["scores_nk"] = np.tile(levels, (count, 1))
        out["item_valid_nk"] = np.ones((count, list_size), np.float32)
    return out


def load(spec: ImageDataSpec, kind: str, image_shape: tuple[int, int, int], num_classes: int,
         seed: int) -> dict[str, np.ndarray]:
    """The arrays of data kind `kind` from `spec.source`, checked against the model's images."""
    if spec.source == "tiny":
        return tiny_data(kind, spec.tiny_examples, image_shape, num_classes, seed)
    if spec.source == "digits":
        if kind not in ("images", "prompts"):
            raise DataSourceError(f"ImageDataSpec.source 'digits' holds labelled images, not "
                                  f"{kind} examples: build preference rows from a model's "
                                  "samples (experiments/diffusion_digits)")
        from prefopt_jax.diffusion import digits
        images, labels = digits.load_digits(image_shape[0], split="train", seed=seed)
        return {"image_nhwc": images, "label_n": labels}
    arrays = (read_arrays(spec.source, kind, num_classes) if spec.source.endswith(".npz")
              else read_rows(spec.source, kind, num_classes))
    for name, array in arrays.items():
        if name.endswith("hwc") and tuple(array.shape[-3:]) != tuple(image_shape):
            raise DataSourceError(f"image data {spec.source!r}: images of shape "
                                  f"{tuple(array.shape[-3:])}, the model takes {image_shape}")
    return arrays


# --- the loader -----------------------------------------------------------------------------

class ImageLoader:
    """Global batches from an endless stream of per-epoch permutations (exact resume).

    Example `j` of the stream is `perm_e[j mod N]` with `e = j // N` and `perm_e` drawn from
    `(seed, e)`; a step takes the next `batch_size` of them. Every host draws the same global
    batch (images are small) and gives its devices their rows.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.count = len(next(iter(arrays.values())))
        self.position = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng((self.seed, epoch)).permutation(
                self.count)}
        return self._perms[epoch]

    def indices(self, start: int, size: int) -> np.ndarray:
        """Example indices of stream positions [start, start + size)."""
        return np.asarray([self._perm(j // self.count)[j % self.count]
                           for j in range(start, start + size)], np.int64)

    def next_batch(self) -> dict[str, np.ndarray]:
        """The next global batch, with `pair_valid` and `example_index`."""
        index = self.indices(self.position, self.batch_size)
        self.position += self.batch_size
        batch = {k: v[index] for k, v in self.arrays.items()}
        batch["pair_valid"] = np.ones(len(index), np.float32)
        batch["example_index"] = index
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.position // self.count}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

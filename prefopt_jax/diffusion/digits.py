"""Real images for diffusion studies: scikit-learn's handwritten digits, and PNG grids.

``load_digits`` reads the 1,797 8x8 digits that scikit-learn ships inside its package (values
0..16, ink bright on a dark ground; nothing is downloaded), upsamples them bilinearly to
``size x size`` and scales them to [-1, 1], the range the DiT works in
(``prefopt_jax.diffusion.model``). A seeded, stratified split holds out a fraction of every class
for evaluation (held-out accuracy of the reward classifier, FID-like distances).

Shape letters (array-name suffixes):
    n  images    h, w  image height and width    c  channels
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import numpy as np

from prefopt_jax.errors import ConfigError, DataSourceError, UserError

SOURCE_SIZE = 8  # side of scikit-learn's digits
SOURCE_MAX = 16.0  # their largest pixel value
NUM_CLASSES = 10
SPLITS = ("train", "heldout", "all")
GRID_PAD = 1  # pixels of grey between grid cells
GRID_PAD_VALUE = 128
LABEL_STRIP = 12  # pixels under each cell for its label (PIL's default bitmap font is ~11 high)


class MissingPackageError(UserError, ImportError):
    """An optional package that a feature needs is not installed."""


@functools.cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``[1797, 8, 8]`` float64 in 0..16 and labels int32."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise MissingPackageError("load_digits needs scikit-learn: pip install scikit-learn") \
            from None
    data = sklearn_digits()
    return np.asarray(data.images, np.float64), np.asarray(data.target, np.int32)


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of 1-D linear interpolation with half-pixel centres, sample
    positions clamped to the edge pixels (the convention of ``jax.image.resize`` and PIL)."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1.0 - (src - lo))
    np.add.at(weights, (np.arange(n_out), hi), src - lo)
    return weights


def upsample_bilinear(images_nhwc: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of square images to ``size x size``, in numpy (float64 inside).

    Bilinear is separable: rows then columns, each a small matrix product (no jit compile per
    batch size, which ``jax.image.resize`` would cost on every split).
    """
    weights_oi = interpolation_matrix(images_nhwc.shape[1], size)
    out = np.einsum("oh,nhwc,pw->nopc", weights_oi, np.asarray(images_nhwc, np.float64),
                    weights_oi)
    return out.astype(np.float32)


def split_indices(labels_n: np.ndarray, split: str, heldout_fraction: float,
                  seed: int) -> np.ndarray:
    """Sorted indices of ``split``: per class, a seeded shuffle holds out
    ``round(heldout_fraction * class size)`` images; ``train`` is the rest, ``all`` everything."""
    if split not in SPLITS:
        raise DataSourceError(f"digits split {split!r} is unknown; choose one of "
                              f"{', '.join(SPLITS)}")
    if split == "all":
        return np.arange(len(labels_n))
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction={heldout_fraction} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels_n), bool)
    # Stratified so that every class keeps its share in both splits whatever the seed.
    for label in np.unique(labels_n):
        members = rng.permutation(np.flatnonzero(labels_n == label))
        heldout[members[:int(round(heldout_fraction * len(members)))]] = True
    return np.flatnonzero(heldout if split == "heldout" else ~heldout)


def load_digits(size: int = 16, split: str = "train", heldout_fraction: float = 0.2,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits as ``(images_nhwc, labels_n)``.

    Args:
        size: side of the returned images, a multiple of 8 (8 keeps the originals).
        split: ``train``, ``heldout`` (``heldout_fraction`` of each class) or ``all``.
        heldout_fraction: share of each class held out; the split is fixed by ``seed``.
        seed: seed of the split.

    Returns:
        images ``[N, size, size, 1]`` float32 in [-1, 1] (ink at +1) and labels ``[N]`` int32.
    """
    if not isinstance(size, int) or size <= 0 or size % SOURCE_SIZE:
        raise ConfigError(f"digits size={size!r} must be a positive multiple of {SOURCE_SIZE}")
    raw_nhw, labels_n = _raw_digits()
    index_n = split_indices(labels_n, split, heldout_fraction, seed)
    images_nhwc = (raw_nhw[index_n, :, :, None] * (2.0 / SOURCE_MAX) - 1.0).astype(np.float32)
    if size != SOURCE_SIZE:
        images_nhwc = np.clip(upsample_bilinear(images_nhwc, size), -1.0, 1.0)
    return images_nhwc, labels_n[index_n].copy()


def _to_uint8(images_nhwc) -> np.ndarray:
    """[-1, 1] -> 0..255 (clipped, rounded)."""
    x = np.asarray(images_nhwc, np.float64)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def grid_shape(n: int, height: int, width: int, nrow: int | None = None,
               labelled: bool = False) -> tuple[int, int]:
    """``(height, width)`` in pixels of the grid ``save_grid`` writes for ``n`` cells."""
    if nrow is not None and nrow < 1:
        raise ConfigError(f"save_grid: nrow={nrow} must be at least 1")
    per_row = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / per_row)
    cell_h = height + (LABEL_STRIP if labelled else 0)
    return rows * (cell_h + GRID_PAD) + GRID_PAD, per_row * (width + GRID_PAD) + GRID_PAD


def save_grid(images_nhwc, path, nrow: int | None = None,
              labels: Sequence | None = None, *, scale: int = 1) -> str:
    """Write images as one PNG grid and return ``path``.

    Args:
        images_nhwc: ``[N, H, W, C]`` with C 1 (grey) or 3 (RGB), values in [-1, 1] (clipped).
        path: the PNG to write; missing parent directories are created.
        nrow: images per row (torchvision's convention); default ``ceil(sqrt(N))``.
        labels: optional text (``str(label)``) written in a strip under each image.
        scale: integer nearest-neighbour magnification of each image (16x16 digits are tiny).
    """
    from PIL import Image, ImageDraw  # matplotlib's own image backend; no GUI involved
    x = np.asarray(images_nhwc)
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or not len(x):
        raise ConfigError(f"save_grid: images of shape {x.shape} are not [N, H, W, 1 or 3]")
    if labels is not None and len(labels) != len(x):
        raise ConfigError(f"save_grid: {len(labels)} labels for {len(x)} images")
    cells = _to_uint8(x).repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = cells.shape
    per_row = nrow or math.ceil(math.sqrt(n))
    grid_h, grid_w = grid_shape(n, h, w, per_row, labels is not None)
    grid = np.full((grid_h, grid_w, c), GRID_PAD_VALUE, np.uint8)
    cell_h = (grid_h - GRID_PAD) // math.ceil(n / per_row)
    for i in range(n):
        top, left = (i // per_row) * cell_h + GRID_PAD, (i % per_row) * (w + GRID_PAD) + GRID_PAD
        grid[top:top + h, left:left + w] = cells[i]
        if labels is not None:
            grid[top + h:top + h + LABEL_STRIP, left:left + w] = 0  # dark strip, white text
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)  # uint8: mode L or RGB
    if labels is not None:
        draw, ink = ImageDraw.Draw(image), 255 if c == 1 else (255, 255, 255)
        for i, label in enumerate(labels):
            top, left = (i // per_row) * cell_h + GRID_PAD, (i % per_row) * (w + GRID_PAD)
            draw.text((left + GRID_PAD, top + h), str(label), fill=ink)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, format="PNG")
    return str(path)

"""Per-sample stain normalisation (Reinhard et al. 2001, "Color transfer between images").

A sample is one subject's slide, stained once: every cell of it shares the stain's tint and strength. Reinhard's
method moves the colour statistics of a source (the sample's cells) onto a target's (the training set's) in the
lαβ space, where the channels of natural images are nearly decorrelated: per channel, subtract the source's mean,
scale by the ratio of standard deviations, add the target's mean. Only cell pixels count and change: the black
outside a C-NMC crop's mask is neither measured nor moved.

The statistics of a slide are fitted on its own cells, never on another sample's; a sample's composition moves
them (blasts and normal cells do not have one colour), which is why the choice between this and no normalisation
is measured on mixed samples (bench/quality.py --stain-norm), not on single-class subjects.

Pure numpy; the trainer fits each training subject to the pooled training statistics, the worker each sample.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import AllscoreError

METHOD = "reinhard-lab"
# A pixel is a cell pixel when its brightest channel is above this (C-NMC crops are black outside the cell).
FOREGROUND_MIN = 8
# The cells of a sample its statistics are fitted on (the first ones read); enough for 3 means and deviations.
FIT_CELLS = 256
# Images at least twice this size are fitted on every other pixel each way.
FIT_STRIDE_FROM = 32

# Reinhard et al.: RGB -> LMS, log10, LMS -> lαβ.
_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
_LMS2RGB = np.linalg.inv(_RGB2LMS)
_LAB2LMS = np.linalg.inv(_LMS2LAB)
_EPS = 1.0 / 255.0  # log10 of a zero channel: clipped to this


class StainError(AllscoreError, ValueError):
    """Statistics that cannot be fitted or used (no cell pixels, a degenerate channel)."""


@dataclass(frozen=True)
class StainStats:
    """Mean and standard deviation of the cell pixels in lαβ, and how many pixels of how many cells gave them."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_pixels: int
    n_cells: int

    @classmethod
    def of(cls, mean: Sequence[float], std: Sequence[float], n_cells: int = 0, n_pixels: int = 0) -> StainStats:
        """Statistics as recorded (a manifest's target), checked: three means and three positive deviations."""
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise StainError(
                f"stain statistics mean={list(mean)} std={list(std)}: need three means and three positive deviations"
            )
        m, d = (float(v) for v in mean), (float(v) for v in std)
        return cls((next(m), next(m), next(m)), (next(d), next(d), next(d)), n_pixels, n_cells)


# The colour maps are 3x3 (or 3x4, with an offset) matrices applied to every pixel: OpenCV's cv2.transform does that
# in one SIMD pass; numpy's (N, 3) @ (3, 3) is the plain fallback (ALLSCORE_STAIN_NORM_IMPL=numpy forces it).
cv2: Any
try:
    import cv2
except ImportError:  # pragma: no cover - opencv-python-headless comes with allscore[images]
    cv2 = None

_LN10 = float(np.log(10.0))


def _use_opencv() -> bool:
    return cv2 is not None and os.environ.get("ALLSCORE_STAIN_NORM_IMPL", "").lower() != "numpy"


def _transform(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(M, 3) float32 pixels through a 3x3 matrix, or a 3x4 one whose last column is added."""
    m = matrix.astype(np.float32)
    if _use_opencv():
        return cv2.transform(x.reshape(-1, 1, 3), m).reshape(-1, 3)
    out = x @ m[:, :3].T
    if m.shape[1] == 4:
        out += m[:, 3]
    return out


def _foreground(images: np.ndarray) -> np.ndarray:
    # Channel by channel: numpy's max over a last axis of 3 costs 20x more.
    return np.maximum(np.maximum(images[..., 0], images[..., 1]), images[..., 2]) > FOREGROUND_MIN


def _ln_lms(images: np.ndarray) -> np.ndarray:
    """(M, 3) float32: ln of the LMS cone responses of every pixel (clipped at 1/255)."""
    lms = _transform(images.reshape(-1, 3).astype(np.float32), _RGB2LMS / 255.0)
    np.maximum(lms, np.float32(_EPS), out=lms)
    return np.log(lms, out=lms)


def _check(images: np.ndarray, n: int) -> None:
    if n < 16:
        raise StainError(
            f"{len(images)} cell images hold {n} cell pixels (brighter than {FOREGROUND_MIN}): too few to fit the "
            "sample's stain statistics; check that the images are cells, not black"
        )


def fit(images: np.ndarray) -> StainStats:
    """The lαβ statistics of the cell pixels of `images` ((N, H, W, 3) or (H, W, 3) uint8)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.shape[1] >= 2 * FIT_STRIDE_FROM and images.shape[2] >= 2 * FIT_STRIDE_FROM:
        # Every other pixel each way: the same means and deviations (to 1e-3) at a quarter of the cost.
        images = images[:, ::2, ::2]
    mask = _foreground(images).reshape(-1)
    n = int(mask.sum())
    _check(images, n)
    # lαβ = LMS2LAB @ log10(lms) = (LMS2LAB / ln 10) @ ln(lms), Reinhard's space
    lab = _transform(_ln_lms(images), _LMS2LAB / _LN10)[mask]
    mean, std = lab.mean(axis=0, dtype=np.float64), lab.std(axis=0, dtype=np.float64)
    if float(std.min()) <= 1e-6:
        raise StainError(f"stain statistics of {len(images)} images: a channel does not vary (std {std.tolist()})")
    return StainStats(
        tuple(float(v) for v in mean),  # type: ignore[arg-type]
        tuple(float(v) for v in std),  # type: ignore[arg-type]
        n,
        len(images),
    )


def normalise(images: np.ndarray, source: StainStats, target: StainStats) -> np.ndarray:
    """`images` (uint8, (..., H, W, 3)) with their cell pixels moved from `source`'s statistics onto `target`'s."""
    images = np.asarray(images)
    mask = _foreground(images)
    if not mask.any():
        return images.copy()
    # Per lαβ channel, lab * scale + shift moves source's mean and deviation onto target's; in ln(LMS) space that is
    # one affine map: ln(lms') = ln10 * LAB2LMS @ (scale * (LMS2LAB / ln10) @ ln(lms) + shift).
    scale = np.asarray(target.std) / np.asarray(source.std)
    shift = np.asarray(target.mean) - np.asarray(source.mean) * scale
    affine = np.hstack([_LAB2LMS @ np.diag(scale) @ _LMS2LAB, (_LN10 * (_LAB2LMS @ shift))[:, None]])
    lms = _transform(_ln_lms(images), affine)
    rgb = _transform(np.exp(lms, out=lms), _LMS2RGB * 255.0)
    moved = np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(images.shape)
    # A cell pixel stays a cell pixel: one pushed to black would read as background to the next step.
    moved[mask & ~_foreground(moved)] = FOREGROUND_MIN + 1
    return np.where(mask[..., None], moved, images)


def normalise_groups(images: np.ndarray, groups: Sequence[Hashable], target: StainStats) -> np.ndarray:
    """Each group's images (one subject's, one sample's) normalised with the group's own statistics onto `target`."""
    if len(groups) != len(images):
        raise StainError(f"{len(images)} images but {len(groups)} group labels")
    out = np.empty_like(images)
    keys = np.asarray([str(g) for g in groups])
    for key in dict.fromkeys(keys.tolist()):
        rows = np.flatnonzero(keys == key)
        out[rows] = normalise(images[rows], fit(images[rows]), target)
    return out

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

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import AllscoreError

METHOD = "reinhard-lab"
# A pixel is a cell pixel when its brightest channel is above this (C-NMC crops are black outside the cell).
FOREGROUND_MIN = 8
# The cells of a sample its statistics are fitted on (the first ones read); enough for 3 means and deviations.
FIT_CELLS = 256

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

    def to_dict(self) -> dict[str, object]:
        return {
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "n_pixels": self.n_pixels,
            "n_cells": self.n_cells,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> StainStats:
        mean = tuple(float(v) for v in data["mean"])  # type: ignore[attr-defined]
        std = tuple(float(v) for v in data["std"])  # type: ignore[attr-defined]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise StainError(f"stain statistics {data!r}: need three means and three positive deviations")
        return cls(mean, std, int(data.get("n_pixels", 0)), int(data.get("n_cells", 0)))  # type: ignore[call-overload]


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in 0..255 -> lαβ (float32)."""
    x = np.maximum(rgb.astype(np.float32) / 255.0, _EPS)
    lms = np.log10(np.maximum(x @ _RGB2LMS.T.astype(np.float32), _EPS))
    return lms @ _LMS2LAB.T.astype(np.float32)


def _to_rgb(lab: np.ndarray) -> np.ndarray:
    """lαβ -> RGB in 0..255 (float32, unclipped)."""
    lms = np.power(np.float32(10.0), lab @ _LAB2LMS.T.astype(np.float32))
    return (lms @ _LMS2RGB.T.astype(np.float32)) * 255.0


def _foreground(images: np.ndarray) -> np.ndarray:
    return images.max(axis=-1) > FOREGROUND_MIN


def fit(images: np.ndarray) -> StainStats:
    """The lαβ statistics of the cell pixels of `images` ((N, H, W, 3) or (H, W, 3) uint8)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    mask = _foreground(images)
    n = int(mask.sum())
    if n < 16:
        raise StainError(
            f"{len(images)} cell images hold {n} cell pixels (brighter than {FOREGROUND_MIN}): too few to fit the "
            "sample's stain statistics; check that the images are cells, not black"
        )
    lab = _to_lab(images[mask])
    mean = lab.mean(axis=0, dtype=np.float64)
    std = lab.std(axis=0, dtype=np.float64)
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
    out = images.copy()
    if not mask.any():
        return out
    scale = np.asarray(target.std, np.float32) / np.asarray(source.std, np.float32)
    shift = np.asarray(target.mean, np.float32) - np.asarray(source.mean, np.float32) * scale
    lab = _to_lab(images[mask]) * scale + shift
    rgb = np.clip(np.rint(_to_rgb(lab)), 0, 255).astype(np.uint8)
    # A cell pixel stays a cell pixel: one pushed to black would read as background to the next step.
    dark = rgb.max(axis=-1) <= FOREGROUND_MIN
    rgb[dark] = FOREGROUND_MIN + 1
    out[mask] = rgb
    return out


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

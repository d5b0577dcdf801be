"""Cutting a found cell out of its field the C-NMC way: the whole cell, black outside its mask, its mask's centroid
at the centre of a 450x450 crop, at the scale the model was trained on (``cut_cell``); and the model's input for it,
pixel for pixel what that crop taken down to the model's size would be, without making the crop (``cut_for_model``).
The cells come from core.segment.segment_field.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from core import morph
from core.segment import FoundCell, SegmentationError, check_rgb

CROP_SIZE = 450  # the side of a C-NMC crop


def _scaled(rgb: np.ndarray, cell: FoundCell, f: float) -> tuple[np.ndarray, float, float]:
    """The cell's bbox, black outside its mask, resized by f (bilinear, the mask resized with it and reapplied)."""
    x0, y0, x1, y1 = cell.bbox
    sub = morph.black_outside(rgb[y0:y1, x0:x1], cell.mask)
    nw, nh = max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f))
    if (nw, nh) == (x1 - x0, y1 - y0):
        return sub, 1.0, 1.0
    if f < 1:  # shrinking: Pillow's bilinear filter widens with the factor (antialiased); OpenCV's does not
        big = np.array(Image.fromarray(sub).resize((nw, nh), Image.BILINEAR))
        off = np.asarray(Image.fromarray(cell.mask.view(np.uint8) * np.uint8(255)).resize((nw, nh), Image.BILINEAR))
    else:
        big = morph.resize_linear(sub, nw, nh)
        off = morph.resize_linear(cell.mask.view(np.uint8) * np.uint8(255), nw, nh)
    big = morph.black_outside(big, off >= 128)
    return big, nw / (x1 - x0), nh / (y1 - y0)


def _offset(cell: FoundCell, fx: float, fy: float, size: int) -> tuple[int, int]:
    """Where the resized bbox's top-left goes so that the mask centroid lands on the output's centre pixel."""
    cx, cy = cell.centroid
    x0, y0 = cell.bbox[0], cell.bbox[1]
    ox = round((size - 1) / 2 - ((cx - x0 + 0.5) * fx - 0.5))
    oy = round((size - 1) / 2 - ((cy - y0 + 0.5) * fy - 0.5))
    return ox, oy


def _paste(out: np.ndarray, sub: np.ndarray, ox: int, oy: int) -> None:
    """sub into out with its top-left at (ox, oy), clipped to out."""
    sy0, sx0 = max(0, -oy), max(0, -ox)
    dy0, dx0 = max(0, oy), max(0, ox)
    hh = min(sub.shape[0] - sy0, out.shape[0] - dy0)
    ww = min(sub.shape[1] - sx0, out.shape[1] - dx0)
    if hh > 0 and ww > 0:
        out[dy0 : dy0 + hh, dx0 : dx0 + ww] = sub[sy0 : sy0 + hh, sx0 : sx0 + ww]


def _check_scales(*values: float) -> None:
    if not all(v > 0 for v in values):
        raise SegmentationError("cutting a cell needs positive scales and size")


def cut_cell(
    rgb: np.ndarray, cell: FoundCell, *, field_um_per_px: float, target_um_per_px: float, size: int = CROP_SIZE
) -> np.ndarray:
    """The cell at ``target_um_per_px``, black outside its mask, its mask centroid at the centre; clipped, not fit."""
    rgb = check_rgb(rgb)
    _check_scales(field_um_per_px, target_um_per_px, size)
    sub, fx, fy = _scaled(rgb, cell, field_um_per_px / target_um_per_px)
    out = np.zeros((size, size, 3), np.uint8)
    _paste(out, sub, *_offset(cell, fx, fy, size))
    return out


def cut_for_model(
    rgb: np.ndarray, cell: FoundCell, *, field_um_per_px: float, train_um_per_px: float, size: int
) -> np.ndarray:
    """The model's input for one cell: exactly ``model_input(cut_cell(..., train_um_per_px, CROP_SIZE), size)``, the
    C-NMC crop at the training scale taken down to the model's size as a crop file would be, without the 450x450
    canvas. The model was trained on crops taken down that way; cutting straight at the input's scale resamples
    once, sharper, and moved a synthetic slide's ALL fraction by +0.03 against its cells' own crops.

    Pillow's resize with ``reducing_gap`` box-reduces by a whole factor first (450 -> 150 for 128); the cell is the
    only non-black part of the crop, so only its block-aligned part is reduced, into a black reduced canvas, which
    is then resized as the whole crop would be. Where the cell reaches the crop's last partial block, the whole crop
    is made instead.
    """
    from core.imaging import REDUCING_GAP, model_input

    rgb = check_rgb(rgb)
    _check_scales(field_um_per_px, train_um_per_px, size)
    sub, fx, fy = _scaled(rgb, cell, field_um_per_px / train_um_per_px)
    ox, oy = _offset(cell, fx, fy, CROP_SIZE)
    k = int(CROP_SIZE / size / REDUCING_GAP) or 1
    whole = CROP_SIZE // k * k
    x0, y0 = max(0, ox) // k * k, max(0, oy) // k * k
    x1 = min(CROP_SIZE, -(-(ox + sub.shape[1]) // k) * k)
    y1 = min(CROP_SIZE, -(-(oy + sub.shape[0]) // k) * k)
    if k == 1 or x1 > whole or y1 > whole or x1 <= x0 or y1 <= y0:
        crop = np.zeros((CROP_SIZE, CROP_SIZE, 3), np.uint8)
        _paste(crop, sub, ox, oy)
        return model_input(crop, size)
    region = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    _paste(region, sub, ox - x0, oy - y0)
    small = np.zeros((-(-CROP_SIZE // k), -(-CROP_SIZE // k), 3), np.uint8)
    small[y0 // k : y1 // k, x0 // k : x1 // k] = np.asarray(Image.fromarray(region).reduce(k))
    return _resize_reduced(small, (y0 // k, y1 // k), (x0 // k, x1 // k), CROP_SIZE / k, size)


def _resize_reduced(
    small: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], side: float, size: int
) -> np.ndarray:
    """``small`` (black but for ``rows`` x ``cols``) resized to ``size`` as the crop's box (0, 0, side, side) of it.

    Where Pillow's arithmetic is exact (the scale side / size a short binary fraction: 150/128, 112.5/96, 225/200)
    only the output pixels the cell reaches are resampled, from the canvas pixels they read, each through the same
    kernel at the same offsets, so the same pixels (tests/unit/test_segment.py) at two thirds of the cost;
    elsewhere (64, 224) the whole canvas is.
    """
    scale = side / size
    if not ((scale * 4096).is_integer() and (side * 4096).is_integer()):
        return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR, box=(0.0, 0.0, side, side)))
    reach = max(scale, 1.0) + 1.0  # the bilinear kernel's support, and a pixel to spare

    def span(lo: int, hi: int) -> tuple[int, int, int, int]:  # output pixels the cell reaches; canvas pixels read
        j0 = max(0, math.floor((lo - reach) / scale - 0.5))
        j1 = min(size, math.ceil((hi + reach) / scale + 0.5))
        return j0, j1, max(0, math.floor(j0 * scale - reach)), min(small.shape[0], math.ceil(j1 * scale + reach))

    i0, i1, r0, r1 = span(*rows)
    j0, j1, c0, c1 = span(*cols)
    out = np.zeros((size, size, 3), np.uint8)
    if i1 > i0 and j1 > j0:
        box = (j0 * scale - c0, i0 * scale - r0, j1 * scale - c0, i1 * scale - r0)
        part = Image.fromarray(np.ascontiguousarray(small[r0:r1, c0:c1])).resize(
            (j1 - j0, i1 - i0), Image.BILINEAR, box=box
        )
        out[i0:i1, j0:j1] = np.asarray(part)
    return out

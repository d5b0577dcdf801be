"""Binary morphology and distance maps for core.segment: OpenCV where it is installed, scipy.ndimage otherwise.

The two give the same pixels (tests/unit/test_morph.py holds them to it). OpenCV's are an order of magnitude faster
on the masks segmentation works on, which is most of what a field costs (bench/README.md, "Microscope fields",
has the figures). OpenCV runs each
call on one thread here: the worker already runs one field per I/O thread, beside the model's threads.
``ALLSCORE_MORPH=scipy`` (read when this module is imported) or ``use("scipy")`` forces the fallback.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

cv2: Any
try:
    import cv2

    cv2.setNumThreads(1)
except ImportError:  # pragma: no cover - opencv-python-headless is a dependency; this is the plain fallback
    cv2 = None

Mask = NDArray[np.bool_]
_CROSS = ndi.generate_binary_structure(2, 1)


def _default_backend() -> str:
    return "opencv" if cv2 is not None and os.environ.get("ALLSCORE_MORPH", "").lower() != "scipy" else "scipy"


# Read once: a field makes about 150 calls here, and reading the environment for each showed in a field's time.
_backend = _default_backend()


def backend() -> str:
    """``opencv`` or ``scipy``: which implementation the functions below use now."""
    return _backend


def use(name: str | None) -> str:
    """Make the functions below use ``name`` (``opencv``, ``scipy``; None: as ALLSCORE_MORPH says); returns the one
    used before. ``opencv`` where OpenCV is not installed is refused."""
    global _backend
    previous = _backend
    if name is None:
        _backend = _default_backend()
    elif name == "scipy" or (name == "opencv" and cv2 is not None):
        _backend = name
    else:
        raise ValueError(f"morphology backend {name!r}: use 'opencv' (needs opencv-python-headless) or 'scipy'")
    return previous


def disk(r: float) -> Mask:
    """The pixels within r of the centre pixel (a (2n+1)-square footprint, n = floor(r)); read-only, cached."""
    return _disk(float(r))


@functools.lru_cache(maxsize=256)
def _disk(r: float) -> Mask:
    n = max(0, math.floor(r))
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    out = np.asarray(xx * xx + yy * yy <= r * r + 1e-9)
    out.flags.writeable = False
    return out


def _u8(mask: Mask) -> NDArray[np.uint8]:
    return np.ascontiguousarray(mask, dtype=bool).view(np.uint8)


def opening(mask: Mask, footprint: Mask) -> Mask:
    """Erosion then dilation by footprint, the outside of the image counting as background (scipy's binary_opening)."""
    if backend() == "scipy":
        return np.asarray(ndi.binary_opening(mask, footprint))
    out = cv2.morphologyEx(
        _u8(mask), cv2.MORPH_OPEN, footprint.astype(np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0
    )
    return np.asarray(out, dtype=bool)


def dilation(mask: Mask, footprint: Mask | None = None) -> Mask:
    """Dilation by footprint (default the 3x3 cross), the outside counting as background (scipy's binary_dilation)."""
    return _step("dilate", mask, footprint)


def erosion(mask: Mask, footprint: Mask | None = None) -> Mask:
    """Erosion by footprint (default the 3x3 cross), the outside counting as background (scipy's binary_erosion)."""
    return _step("erode", mask, footprint)


def _step(op: str, mask: Mask, footprint: Mask | None) -> Mask:
    fp = _CROSS if footprint is None else footprint
    if backend() == "scipy":
        fn = ndi.binary_dilation if op == "dilate" else ndi.binary_erosion
        return np.asarray(fn(mask, fp))
    fn = cv2.dilate if op == "dilate" else cv2.erode
    return np.asarray(fn(_u8(mask), fp.astype(np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0), dtype=bool)


def distance(mask: Mask) -> NDArray[np.float32]:
    """Distance to the nearest False pixel, octagonal: the mean of the city-block and chessboard distances (within 8 %
    of Euclidean). Pixels outside the image are not False; a mask with no False pixel is all zeros here."""
    if not mask.all():
        if backend() == "scipy":
            taxi = ndi.distance_transform_cdt(mask, metric="taxicab")
            chess = ndi.distance_transform_cdt(mask, metric="chessboard")
            return np.asarray((taxi + chess) * 0.5, np.float32)
        m = _u8(mask)
        taxi = cv2.distanceTransform(m, cv2.DIST_L1, 3)
        chess = cv2.distanceTransform(m, cv2.DIST_C, 3)
        return np.asarray((taxi + chess) * 0.5, np.float32)
    return np.zeros(mask.shape, np.float32)


def mean3(values: NDArray[np.float32]) -> NDArray[np.float32]:
    """The 3x3 mean of a float32 image, the border mirrored (scipy's uniform_filter(values, 3), mode 'reflect')."""
    if backend() == "scipy":
        return np.asarray(ndi.uniform_filter(values, 3), np.float32)
    return np.asarray(cv2.blur(values, (3, 3), borderType=cv2.BORDER_REFLECT), np.float32)


def fill_holes(mask: Mask) -> Mask:
    """The mask with its holes filled: background not 4-connected to the image's border (scipy's binary_fill_holes)."""
    if not mask.any() or mask.all():
        return mask.copy()
    if backend() == "scipy":
        lab, n = ndi.label(~mask)
        lut = np.ones(n + 1, bool)
        lut[0] = False
        lut[np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))] = False
        return np.asarray(mask | lut[lab])
    # Flood the background from outside the image (a one-pixel frame), 4-connected; what it cannot reach is a hole.
    h, w = mask.shape
    canvas = np.zeros((h + 2, w + 2), np.uint8)
    canvas[1:-1, 1:-1] = mask
    cv2.floodFill(canvas, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2, flags=4)
    return np.asarray(canvas[1:-1, 1:-1] != 2)


def hull(mask: Mask) -> Mask:
    """The mask's convex hull as pixels: those on or inside the convex polygon through its pixels' centres. The two
    backends may differ by a pixel along the hull's edges."""
    if int(np.count_nonzero(mask)) < 3:
        return mask.copy()
    if backend() == "scipy":
        from skimage.morphology import convex_hull_image

        return np.asarray(convex_hull_image(mask, offset_coordinates=False) | mask)
    points = cv2.findNonZero(_u8(mask))
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(out, cv2.convexHull(points), 1)
    return np.asarray(out, dtype=bool) | mask


def hulls(labels: NDArray[np.int32]) -> Mask:
    """The union of the convex hulls of each label's pixels (all its parts together), as ``hull`` draws them, and the
    labelled pixels. OpenCV: every label's outline in one pass, where no outline runs through two labels (parts of
    two labels touching corner to corner); one hull per label otherwise."""
    out = np.zeros(labels.shape, bool)
    if backend() == "opencv":
        outlines, _ = cv2.findContours(_u8(labels > 0), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        points: dict[int, list[NDArray[np.int32]]] = {}
        for outline in outlines:
            owners = labels[outline[:, 0, 1], outline[:, 0, 0]]
            if owners.min() != owners.max():
                break
            points.setdefault(int(owners[0]), []).append(outline)
        else:
            drawn = np.zeros(labels.shape, np.uint8)
            for parts in points.values():
                cv2.fillConvexPoly(drawn, cv2.convexHull(np.concatenate(parts)), 1)
            return np.asarray(drawn, dtype=bool) | (labels > 0)
    for lab_id, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is not None:
            out[sl] |= hull(labels[sl] == lab_id)
    return out


def corner_hull_area(mask: Mask) -> float:
    """The area of the convex hull of the mask's pixels taken as unit squares (the hull of their corners).

    That hull is the hull of the pixel centres grown by a unit square, whose area is the centres' hull's area plus
    its width plus its height plus one (the Minkowski sum of a convex polygon and a unit square).
    """
    if not mask.any():
        return 0.0
    if backend() == "scipy":
        from scipy.spatial import ConvexHull, QhullError

        ys, xs = np.nonzero(mask & ~erosion(mask))
        centres = np.column_stack([xs, ys]).astype(np.float64)
        try:
            inner = float(ConvexHull(centres).volume)  # a 2-D hull's "volume" is its area
        except QhullError:  # all on one line (or one point): no area
            inner = 0.0
        width = float(centres[:, 0].max() - centres[:, 0].min())
        height = float(centres[:, 1].max() - centres[:, 1].min())
        return inner + width + height + 1.0
    centres = cv2.findNonZero(_u8(mask))  # int32 (n, 1, 2): the hull and its area exactly, in a few calls
    inner = float(cv2.contourArea(cv2.convexHull(centres))) if len(centres) >= 3 else 0.0
    _, _, w, h = cv2.boundingRect(centres)
    return inner + float(w - 1) + float(h - 1) + 1.0


def soften(mask: Mask, sigma: float) -> NDArray[np.uint8]:
    """The mask blurred by a Gaussian of ``sigma`` pixels, outside the image 0, on a 0-255 scale, rounded: scipy's
    gaussian_filter (mode 'constant', radius 4 sigma) pass for pass, with its kernel made once, not per call (that
    was half the cost on a cell's mask)."""
    kernel = _gauss(float(sigma))
    soft = ndi.correlate1d(np.asarray(mask, np.float32), kernel, 0, mode="constant")
    soft = ndi.correlate1d(soft, kernel, 1, mode="constant")
    return np.round(soft * 255).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _gauss(sigma: float) -> NDArray[np.float64]:
    """scipy.ndimage's Gaussian kernel (truncate 4.0), computed as it computes it."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    out = (phi / phi.sum())[::-1].copy()
    out.flags.writeable = False
    return out


def resize_linear(image: NDArray[np.uint8], width: int, height: int) -> NDArray[np.uint8]:
    """A uint8 image (H, W) or (H, W, 3) resized bilinearly, pixel centres aligned (OpenCV's INTER_LINEAR, or
    Pillow's BILINEAR in the fallback: they differ by at most one grey level). For enlarging: neither antialiases."""
    if backend() == "scipy":
        from PIL import Image

        return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
    return np.asarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR))


def black_outside(image: NDArray[np.uint8], mask: Mask) -> NDArray[np.uint8]:
    """A new (H, W, 3) uint8 image: ``image`` where ``mask`` holds, black elsewhere. (OpenCV's masked AND; numpy's
    masked assignment or broadcast multiply over three channels costs about ten times as much.)"""
    if backend() == "scipy":
        return np.where(np.asarray(mask, bool)[..., None], image, np.uint8(0))
    return np.asarray(cv2.bitwise_and(image, image, mask=_u8(mask)))


def component_areas(mask: Mask) -> NDArray[np.int64]:
    """The pixel counts of the mask's 4-connected components (in no particular order)."""
    if backend() == "scipy":
        lab, n = ndi.label(mask)
        return np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64)
    _, _, stats, _ = cv2.connectedComponentsWithStats(_u8(mask), connectivity=4)
    return np.asarray(stats[1:, cv2.CC_STAT_AREA], np.int64)


def label(mask: Mask) -> tuple[NDArray[np.int32], int]:
    """4-connected components numbered 1..n in the order their first pixel comes in a raster scan (scipy's label;
    OpenCV's numbering is the same, tests/unit/test_morph.py checks it)."""
    if backend() == "scipy":
        lab, n = ndi.label(mask)
        return np.asarray(lab, np.int32), int(n)
    n, lab = cv2.connectedComponents(_u8(mask), connectivity=4, ltype=cv2.CV_32S)
    return np.asarray(lab, np.int32), int(n) - 1

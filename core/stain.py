"""What detection reads of a field's colour: the shrunk planar copy it works on, and per pixel the stain score
OD(green) - OD(blue), the mean optical density and the specimen mask (not near-black) against the field's bright
background (core.segment's module docstring, step 2); with the partial-sort percentiles they and the kind rule
(core.cellkind) use."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

NEAR_BLACK = 24  # a pixel whose brightest channel is at most this holds no specimen
NUC_SCORE = 0.33  # stain score (OD green - OD blue) of nuclei


def shrink(rgb: NDArray[np.uint8], k: int) -> NDArray[np.float32]:
    """Planar (3, h, w) float copy shrunk k times: the mean of four samples per k x k block (cheap anti-aliasing);
    the partial blocks at the far edges are dropped."""
    h, w = rgb.shape[0] // k, rgb.shape[1] // k
    offs = (0, k // 2) if k > 1 else (0,)
    acc = np.zeros((3, h, w), np.float32)
    for a in offs:
        for b in offs:
            acc += rgb[a : a + h * k : k, b : b + w * k : k].transpose(2, 0, 1)
    if k > 1:
        acc *= 0.25
    return acc


def stain(
    img: NDArray[np.float32], bg: list[float] | None = None
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.bool_], list[float] | None]:
    """Stain score OD(G) - OD(B), mean optical density, the specimen mask (not near-black), and the field's bright
    background colour (None where it has none: densities are then taken against white). ``img`` (shrink's copy) is
    used up: its planes are overwritten (a new whole-field temporary cost more than the logarithms)."""
    r, g, b = img
    specimen = np.maximum(r, g)
    np.maximum(specimen, b, out=specimen)
    specimen = specimen > NEAR_BLACK
    has_bg = bg is not None
    bg = bg or [255.0, 255.0, 255.0]
    if not has_bg and int(specimen.sum()) >= 16:
        bright = r + g
        bright += b
        bright *= 1.0 / 3.0
        hi = percentile(bright[specimen], 97)
        if hi > 120:
            sel = np.flatnonzero(specimen & (bright >= hi))
            bg = [percentile(c.ravel()[sel], 50) for c in img]  # medians, by one partial sort each
            has_bg = True
    # In place, with as few whole-field temporaries as possible (each costs its page faults):
    # od_c = log(bg_c + 1) - log(c + 1); score = od_g - od_b; dens = mean of the three.
    lg = img
    lg += np.float32(1.0)
    np.log(lg, out=lg)
    c = [math.log(v + 1.0) for v in bg]
    score = lg[2] - lg[1]
    score += np.float32(c[1] - c[2])
    dens = lg[0] + lg[1]
    dens += lg[2]
    dens *= np.float32(-1.0 / 3.0)
    dens += np.float32((c[0] + c[1] + c[2]) / 3.0)
    score *= specimen
    dens *= specimen
    return score, dens, specimen, (bg if has_bg else None)


def percentile(v: NDArray[np.float32], q: float) -> float:
    """np.percentile(v, q) (linear interpolation) for a 1-D array, by one partial sort: a tenth of its overhead."""
    return percentiles(v, (q,))[0]


def percentiles(v: NDArray[np.float32], qs: tuple[float, ...]) -> list[float]:
    """np.percentile(v, q) for each q (linear interpolation) of a 1-D array, from one partial sort."""
    spots = []
    for q in qs:
        pos = q / 100 * (v.size - 1)
        lo = int(pos)
        spots.append((pos, lo, min(lo + 1, v.size - 1)))
    part = np.partition(v, sorted({i for _, lo, hi in spots for i in (lo, hi)}))
    out = []
    for pos, lo, hi in spots:
        a, b = float(part[lo]), float(part[hi])
        out.append(a + (b - a) * (pos - lo))
    return out

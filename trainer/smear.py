"""The smear around a synthetic field's white cells (THE DATA IS SYNTHETIC): its colours, the red cells (mostly side
by side, some overlapping one another, some lying under or over a white cell's edge), the platelets, the uneven
smear thickness and the vignetting. trainer.synth_fields composes them with the white cells into a field.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

from trainer.white_cells import TRIES, WhiteCell

log = logging.getLogger(__name__)

# --- Smear appearance ---------------------------------------------------------------------------------
BACKGROUND_RGB = np.array([240.0, 230.0, 222.0])  # light pinkish cream, as a brightfield smear's plasma
RBC_RIM_RGB = np.array([208.0, 132.0, 138.0])  # a red cell's thick rim on that background
PLATELET_RGB = np.array([140.0, 95.0, 165.0])  # a platelet's granules
# Optical densities (Beer-Lambert): overlapping red cells look darker, a red cell over a white cell tints it.
RBC_OD = np.log(BACKGROUND_RGB / RBC_RIM_RGB)
PLATELET_OD = np.log(BACKGROUND_RGB / PLATELET_RGB)
RBC_DIAMETER_UM = (6.5, 8.5)  # mean 7.5
RBC_COVERAGE = (0.30, 0.50)  # fraction of the field under red cells
PLATELET_DIAMETER_UM = (2.0, 3.0)
PLATELETS_PER_RBC = 1 / 15
NOISE_SIGMA = 2.0  # sensor noise, grey levels
VIGNETTE = (0.06, 0.16)  # brightness lost in the corners
OVER_RBC_REACH = 0.22  # how far (in red-cell diameters) a red cell drawn over a white cell reaches into it


def add_red_cells(
    rng: np.random.Generator, under: np.ndarray, over: np.ndarray, whites: list[WhiteCell], um_per_px: float
) -> None:
    """Red cells until about the drawn coverage: mostly apart or just touching, some overlapping one another.

    Near a white cell a red cell either lies under it or, reaching at most OVER_RBC_REACH of its diameter into
    the white cell's outline, over it.
    """
    height, width = under.shape
    coverage = rng.uniform(*RBC_COVERAGE)
    mean_area = math.pi * (float(np.mean(RBC_DIAMETER_UM)) / 2 / um_per_px) ** 2
    white_area = sum(float(c.alpha.sum()) for c in whites)
    target = coverage * (width * height) + 0.5 * white_area
    centres = np.zeros((0, 2))
    radii = np.zeros(0)
    wx = np.array([c.centre[0] for c in whites])
    wy = np.array([c.centre[1] for c in whites])
    wr = np.array([c.radius for c in whites])
    area = 0.0
    misses = 0
    while area < target and misses < 20:
        diameter = float(np.clip(rng.normal(7.5, 0.5), *RBC_DIAMETER_UM)) / um_per_px
        r = diameter / 2
        x = rng.uniform(-r * 0.6, width + r * 0.6, TRIES)
        y = rng.uniform(-r * 0.6, height + r * 0.6, TRIES)
        # Red cells mostly lie side by side (about a tenth overlapping a neighbour by up to half).
        squeeze = 0.55 if rng.random() < 0.12 else 0.92
        ok = np.ones(TRIES, bool)
        if len(radii):
            d = np.hypot(x[:, None] - centres[None, :, 0], y[:, None] - centres[None, :, 1])
            ok &= (d > squeeze * (r + radii[None, :])).all(axis=1)
        layer = under
        if len(wr):
            dw = np.hypot(x[:, None] - wx[None, :], y[:, None] - wy[None, :]) - wr[None, :]
            nearest = dw.min(axis=1)
            ok &= nearest > -0.1 * wr[dw.argmin(axis=1)]  # at most about half under a white cell
        hits = np.flatnonzero(ok)
        if not len(hits):
            misses += 1
            continue
        k = hits[0]
        if len(wr) and nearest[k] < r and rng.random() < 0.5 and nearest[k] > (1 - 2 * OVER_RBC_REACH) * r:
            layer = over  # overlaps a white cell's edge, drawn over it
        _draw_red_cell(rng, layer, float(x[k]), float(y[k]), r)
        centres = np.vstack([centres, [x[k], y[k]]])
        radii = np.append(radii, r)
        area += math.pi * r * r
    log.debug("%d red cells, %.0f%% of the mean area", len(radii), 100 * area / max(mean_area, 1.0))


def _draw_red_cell(rng: np.random.Generator, layer: np.ndarray, x: float, y: float, r: float) -> None:
    """Add one red cell's thickness (1 at the rim) to layer: a slightly oval disc with a paler centre."""
    height, width = layer.shape
    half = math.ceil(r * 1.1 + 2)
    ix, iy = round(x), round(y)
    x0, x1, y0, y1 = max(0, ix - half), min(width, ix + half + 1), max(0, iy - half), min(height, iy + half + 1)
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx + 0.5 - x, yy + 0.5 - y
    angle = rng.uniform(0, math.pi)
    ovality = 1.0 + abs(rng.normal(0.0, 0.05))
    c, s = math.cos(angle), math.sin(angle)
    u, v = (dx * c + dy * s) / ovality, (-dx * s + dy * c) * ovality
    rho = np.hypot(u, v)
    t = rho / r
    pallor = rng.uniform(0.35, 0.6)  # thickness at the centre relative to the rim
    rim = np.where(t < 0.72, pallor + (1 - pallor) * (t / 0.72) ** 2, 1.0 - 0.35 * ((t - 0.72) / 0.28) ** 2)
    edge = np.clip(r - rho + 0.5, 0.0, 1.0)
    layer[y0:y1, x0:x1] += (rim * edge * rng.uniform(0.85, 1.1)).astype(np.float32)


def add_platelets(
    rng: np.random.Generator, layer: np.ndarray, whites: list[WhiteCell], um_per_px: float, count: int
) -> None:
    """Platelets: small purple dots of a few granules in a faint halo, away from the white cells."""
    height, width = layer.shape
    for _ in range(count):
        r = rng.uniform(*PLATELET_DIAMETER_UM) / 2 / um_per_px
        x, y = rng.uniform(r, width - r, 16), rng.uniform(r, height - r, 16)
        ok = np.ones(16, bool)
        for cell in whites:
            cx, cy = cell.centre
            ok &= np.hypot(x - cx, y - cy) > cell.reach + 2 * r
        hits = np.flatnonzero(ok)
        if not len(hits):
            continue
        px, py = float(x[hits[0]]), float(y[hits[0]])
        half = math.ceil(r + 3)
        ix, iy = round(px), round(py)
        x0, x1, y0, y1 = max(0, ix - half), min(width, ix + half + 1), max(0, iy - half), min(height, iy + half + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx + 0.5 - px, yy + 0.5 - py
        patch = 0.35 * np.clip(r - np.hypot(dx, dy) + 0.5, 0.0, 1.0)
        for _ in range(int(rng.integers(4, 10))):
            a, d = rng.uniform(0, 2 * math.pi), r * 0.7 * math.sqrt(rng.uniform())
            g = max(0.8, r * rng.uniform(0.18, 0.3))
            patch += 0.8 * np.exp(-((dx - d * math.cos(a)) ** 2 + (dy - d * math.sin(a)) ** 2) / (2 * g * g))
        layer[y0:y1, x0:x1] += np.minimum(patch, 1.3)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], grain: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with about `grain` blobs across, upscaled smoothly to shape."""
    coarse = rng.standard_normal((grain, grain)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


def vignette(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Illumination falling off gently from a point near the centre."""
    strength = rng.uniform(*VIGNETTE)
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    norm = (width / 2) ** 2 + (height / 2) ** 2
    x = ((np.arange(width, dtype=np.float32) - cx) ** 2)[None, :]
    y = ((np.arange(height, dtype=np.float32) - cy) ** 2)[:, None]
    return 1.0 - strength * np.minimum((x + y) / norm, 1.5)

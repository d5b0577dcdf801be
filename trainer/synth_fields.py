"""Synthetic microscope fields: whole smear-like photographs with known white cells. THE DATA IS SYNTHETIC.

A field imitates a photograph of a stained peripheral-blood or marrow smear at high magnification: a light pinkish-
cream background with gentle vignetting and sensor noise, red cells (pink discs about 7.5 um across with a paler
centre, some overlapping one another) covering 30-50% of it, a few platelets (small purple granular dots) and a
given number of white cells. The white cells are trainer.synth's C-NMC-like lymphoid cells: each is drawn by
render_cell at the C-NMC crops' scale (SYNTH_UM_PER_PX), rescaled to the slide's scale (one slide, one
magnification: drawn once from a range, so a cell keeps its size in micrometres) and laid over the background by its
coverage, the nucleus opaque and the cytoplasm partly see-through (CYTOPLASM_OPACITY: on a smear it is a thin, paler
layer, where the C-NMC crops show it as dark as the nucleus). About ``touching`` of them touch another white cell
(outlines meeting, not overlapping), some red cells overlap white cells' edges (over or under them) and a few white
cells are cut by the field's edge on purpose. Nothing made here is a real cell.

Layout under OUT:

- ``fields/field_NNN.png``: the fields, RGB PNG.
- ``truth.csv``: one row per white cell: ``field,index,x,y,radius_px,diameter_um,label,edge,um_per_px,crop``
  (field: the PNG's path relative to OUT; index: 1.. within the field; x, y: the centroid of the cell's visible
  part in field pixels; radius_px and diameter_um: the whole cell's equivalent-circle radius in field pixels and
  diameter in micrometres; label all|hem; edge 1 when the field's edge cuts the cell; um_per_px: the field's
  scale; crop: the cell's crop relative to OUT, or empty).
- with crops: ``crops/{all,hem}/cell_NNNN.bmp``: each white cell as its field shows it, cut out by its true
  outline (black outside, centred, 450x450 at SYNTH_UM_PER_PX): a perfect segmentation's crop, so the same cells
  can be scored as crops and as fields and the difference is the worker's segmentation, scale and cut alone. (The
  cell as render_cell drew it, before it went into the field, has the crops' dark cytoplasm: not what the field
  shows.)

Output is deterministic for a seed; a 1024x768 field takes about 0.2 s.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.cut import cut_cell
from core.segment import FoundCell
from trainer.dataset import CLASS_NAMES, DatasetError
from trainer.synth import SYNTH_UM_PER_PX, render_cell_layers, subject_tint

log = logging.getLogger(__name__)

CROP_SIZE = 450
TRUTH_COLUMNS = ("field", "index", "x", "y", "radius_px", "diameter_um", "label", "edge", "um_per_px", "crop")

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

# --- White cells ------------------------------------------------------------------------------------
EDGE_PROBABILITY = 0.06  # a white cell is placed cut by the field's edge
WHITE_GAP_UM = 2.0  # least gap between white cells that are not placed touching
CYTOPLASM_OPACITY = 0.45  # the cytoplasm's colour over the background's: lilac on a smear, not the crops' purple
OVER_RBC_REACH = 0.22  # how far (in red-cell diameters) a red cell drawn over a white cell reaches into it
_TRIES = 96


@dataclass(frozen=True)
class FieldsSummary:
    """What synthesize_fields wrote: fields, white cells per class, and how long it took."""

    root: Path
    n_fields: int
    n_cells: int
    n_all: int
    seconds: float

    @property
    def n_hem(self) -> int:
        """Normal white cells written."""
        return self.n_cells - self.n_all

    def describe(self) -> str:
        """One line for the command line."""
        return (
            f"{self.n_fields} synthetic fields with {self.n_cells} white cells ({self.n_all} all, {self.n_hem} hem) "
            f"in {self.root} ({self.seconds:.1f} s)"
        )


@dataclass
class _WhiteCell:
    """One white cell at its field's scale: premultiplied colour and coverage cropped to the cell."""

    malignant: bool
    colour: np.ndarray  # (3, h, w) float32, premultiplied by opacity
    alpha: np.ndarray  # (h, w) float32: where the cell is (its outline, for the truth and for placing it)
    opacity: np.ndarray  # (h, w) float32: how much of the background it hides (less in the cytoplasm)
    cx: float  # centroid within colour/alpha
    cy: float
    radius: float  # equivalent-circle radius, pixels
    reach: float  # farthest covered pixel from the centroid, pixels
    x0: int = 0  # top-left in the field
    y0: int = 0
    edge: bool = False

    @property
    def mask(self) -> np.ndarray:
        return self.alpha > 0.5

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + self.cx, self.y0 + self.cy


def synthesize_fields(
    out: Path,
    *,
    fields: int = 12,
    cells_per_field: int = 12,
    all_fraction: float = 0.3,
    um_per_px: tuple[float, float] = (0.08, 0.16),
    width: int = 1024,
    height: int = 768,
    touching: float = 0.2,
    seed: int = 0,
    crops: bool = False,
    cytoplasm_opacity: float = CYTOPLASM_OPACITY,
    one_scale: bool = True,
) -> FieldsSummary:
    """Write synthetic smear fields with known white cells under out (see the module docstring).

    The fields are one slide: imaged at one magnification, so every field has one scale, drawn (uniformly) from
    `um_per_px`; ``one_scale=False`` draws one per field (for checks that the same cells give the same result at
    another magnification). cytoplasm_opacity 1.0 lays the cells in exactly as their crops show them (cytoplasm as
    dark as the crop's).
    """
    out = Path(out)
    low, high = um_per_px
    if fields < 1:
        raise DatasetError(f"fields={fields}: need at least one field")
    if cells_per_field < 1:
        raise DatasetError(f"cells_per_field={cells_per_field}: need at least one white cell per field")
    if not 0.0 <= all_fraction <= 1.0:
        raise DatasetError(f"all_fraction={all_fraction}: must be between 0 and 1")
    if not 0.0 <= touching <= 1.0:
        raise DatasetError(f"touching={touching}: must be between 0 and 1")
    if not 0.0 < cytoplasm_opacity <= 1.0:
        raise DatasetError(f"cytoplasm_opacity={cytoplasm_opacity}: must be above 0 and at most 1")
    if not 0.0 < low <= high:
        raise DatasetError(f"um_per_px={um_per_px}: need 0 < low <= high micrometres per pixel")
    if width < 128 or height < 128:
        raise DatasetError(f"{width}x{height}: fields must be at least 128x128 pixels")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: exists and is not an empty folder; choose a new folder for the fields")
    started = time.perf_counter()
    (out / "fields").mkdir(parents=True, exist_ok=True)
    if crops:
        for name in CLASS_NAMES:
            (out / "crops" / name).mkdir(parents=True, exist_ok=True)
    tint = subject_tint(np.random.default_rng([seed, 5]))  # one subject (one stain) for the whole sample
    rows: list[dict[str, object]] = []
    n_all = 0
    slide_scale = float(np.random.default_rng([seed, 6]).uniform(low, high))
    for number in range(1, fields + 1):
        rng = np.random.default_rng([seed, 5, number])  # one stream per field
        field_scale = float(rng.uniform(low, high))
        scale = field_scale if not one_scale else slide_scale
        image, cells = make_field(
            rng, tint, scale, width, height, cells_per_field, all_fraction, touching, cytoplasm_opacity
        )
        field_name = f"fields/field_{number:03d}.png"
        Image.fromarray(image).save(out / field_name, "PNG", compress_level=1)  # noise: level 6 is 2x slower
        for index, cell in enumerate(cells, start=1):
            label = CLASS_NAMES[int(cell.malignant)]
            crop_name = ""
            x, y = _visible_centroid(cell, width, height)
            if crops:
                crop_name = f"crops/{label}/cell_{len(rows) + 1:04d}.bmp"
                Image.fromarray(_as_imaged(image, cell, (x, y), scale)).save(out / crop_name, "BMP")
            rows.append(
                {
                    "field": field_name,
                    "index": index,
                    "x": f"{x:.1f}",
                    "y": f"{y:.1f}",
                    "radius_px": f"{cell.radius:.1f}",
                    "diameter_um": f"{2 * cell.radius * scale:.2f}",
                    "label": label,
                    "edge": int(cell.edge),
                    "um_per_px": f"{scale:.4f}",
                    "crop": crop_name,
                }
            )
            n_all += int(cell.malignant)
    with (out / "truth.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TRUTH_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    summary = FieldsSummary(
        root=out, n_fields=fields, n_cells=len(rows), n_all=n_all, seconds=time.perf_counter() - started
    )
    log.info("synthesized %d fields in %.1f s", fields, summary.seconds)
    return summary


def make_field(
    rng: np.random.Generator,
    tint: np.ndarray | None,
    um_per_px: float,
    width: int = 1024,
    height: int = 768,
    cells: int = 12,
    all_fraction: float = 0.3,
    touching: float = 0.2,
    cytoplasm_opacity: float = CYTOPLASM_OPACITY,
) -> tuple[np.ndarray, list[_WhiteCell]]:
    """One field as (height, width, 3) uint8 RGB and the white cells placed in it (fewer when they do not fit)."""
    whites = [
        _white_cell(rng, bool(rng.random() < all_fraction), tint, um_per_px, cytoplasm_opacity) for _ in range(cells)
    ]
    placed = _place_white_cells(rng, whites, width, height, um_per_px, touching)

    under = np.zeros((height, width), np.float32)  # red-cell thickness below the white cells
    over = np.zeros((height, width), np.float32)  # ... and above them
    _add_red_cells(rng, under, over, placed, um_per_px)
    platelets = np.zeros((height, width), np.float32)
    n_platelets = int(rng.poisson(max(1.0, float(over.size) * um_per_px**2 / 44.0 * 0.4 * PLATELETS_PER_RBC)))
    _add_platelets(rng, platelets, placed, um_per_px, n_platelets)

    # Channel-first (3, height, width) float32 from here: whole-field arithmetic on contiguous planes.
    paper = (BACKGROUND_RGB * (1.0 + 0.015 * rng.standard_normal(3))).astype(np.float32)
    smear = 1.0 + 0.025 * _smooth_noise(rng, (height, width), 6)  # uneven smear thickness
    field = np.empty((3, height, width), np.float32)
    for c in range(3):
        od = under * np.float32(RBC_OD[c]) + platelets * np.float32(PLATELET_OD[c])
        field[c] = paper[c] * smear * np.exp(-od)
    for cell in placed:
        _composite(field, cell)
    covered = over > 0
    if covered.any():
        field[:, covered] *= np.exp(-over[covered][None, :] * RBC_OD.astype(np.float32)[:, None])
    field *= _vignette(rng, height, width)[None]
    noise = np.frombuffer(rng.bytes(2 * field.size), np.uint8).reshape(2, *field.shape)
    field += (noise[0].astype(np.float32) + noise[1] - 254.5) * np.float32(NOISE_SIGMA / 104.0)  # triangular
    return np.clip(field + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy(), placed


def _white_cell(
    rng: np.random.Generator,
    malignant: bool,
    tint: np.ndarray | None,
    um_per_px: float,
    cytoplasm_opacity: float = CYTOPLASM_OPACITY,
) -> _WhiteCell:
    """A render_cell cell rescaled from SYNTH_UM_PER_PX to the field's um_per_px."""
    crop, alpha, nucleus = render_cell_layers(rng, malignant, tint, CROP_SIZE)
    side = max(8, round(CROP_SIZE * SYNTH_UM_PER_PX / um_per_px))
    # The crop is already premultiplied by its coverage: resample colour and coverage together, linearly
    # ("RGBa" is Pillow's premultiplied mode, which it resamples as it is).
    rgba = np.dstack([crop, np.round(alpha * 255.0).astype(np.uint8)])
    small = np.asarray(Image.fromarray(rgba, "RGBa").resize((side, side), Image.Resampling.BILINEAR), np.float32)
    nuc = Image.fromarray(np.round(nucleus * 255.0).astype(np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    cover = small[..., 3] / 255.0
    rows, cols = np.nonzero(cover > 0.002)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    cover = np.ascontiguousarray(cover[y0:y1, x0:x1])
    colour = np.minimum(small[y0:y1, x0:x1, :3], cover[..., None] * 255.0).transpose(2, 0, 1)
    # On a smear the cytoplasm is a thin, paler layer over the background; the nucleus hides it.
    nuc_cover = np.minimum(np.asarray(nuc, np.float32)[y0:y1, x0:x1] / 255.0, cover)
    inside = np.divide(nuc_cover, cover, out=np.zeros_like(cover), where=cover > 0)
    keep = inside + (1.0 - inside) * cytoplasm_opacity
    colour = (colour * keep[None]).copy()
    opacity = cover * keep
    yy, xx = np.mgrid[0 : cover.shape[0], 0 : cover.shape[1]]
    total = float(cover.sum())
    cx, cy = float((cover * xx).sum() / total), float((cover * yy).sum() / total)
    inside = cover > 0.002
    reach = float(np.hypot(xx[inside] - cx, yy[inside] - cy).max()) + 1.0
    return _WhiteCell(malignant, colour, cover, opacity, cx, cy, math.sqrt(total / math.pi), reach)


def _place_white_cells(
    rng: np.random.Generator, cells: list[_WhiteCell], width: int, height: int, um_per_px: float, touching: float
) -> list[_WhiteCell]:
    """Place cells: some in touching pairs, a few cut by the edge, the rest apart; drops those that do not fit."""
    gap = WHITE_GAP_UM / um_per_px
    n_pairs = int(rng.binomial(len(cells) // 2, touching))
    placed: list[_WhiteCell] = []
    for i, cell in enumerate(cells):
        partner_of = placed[-1] if i % 2 == 1 and i < 2 * n_pairs and placed and not placed[-1].edge else None
        ok = False
        if partner_of is not None:
            ok = _place_touching(rng, cell, partner_of, placed, width, height, gap)
        if not ok and i >= 2 * n_pairs and rng.random() < EDGE_PROBABILITY:
            ok = _place_at_edge(rng, cell, placed, width, height, gap)
        if not ok:
            ok = _place_apart(rng, cell, placed, width, height, gap)
        if ok:
            placed.append(cell)
        else:
            log.debug("a white cell did not fit in a %dx%d field; left out", width, height)
    return placed


def _clear_of(cell: _WhiteCell, x: np.ndarray, y: np.ndarray, others: list[_WhiteCell], gap: float) -> np.ndarray:
    """Which candidate centroids (x, y) keep cell at least gap away from every other white cell."""
    ok = np.ones(x.shape, bool)
    for other in others:
        ox, oy = other.centre
        ok &= np.hypot(x - ox, y - oy) > cell.reach + other.reach + gap
    return ok


def _set_centre(cell: _WhiteCell, x: float, y: float) -> None:
    cell.x0, cell.y0 = round(x - cell.cx), round(y - cell.cy)


def _fits(cell: _WhiteCell, x: np.ndarray, y: np.ndarray, width: int, height: int, margin: int = 4) -> np.ndarray:
    h, w = cell.alpha.shape
    left, top = np.round(x - cell.cx), np.round(y - cell.cy)
    return (left >= margin) & (top >= margin) & (left + w <= width - margin) & (top + h <= height - margin)


def _place_apart(
    rng: np.random.Generator, cell: _WhiteCell, placed: list[_WhiteCell], width: int, height: int, gap: float
) -> bool:
    x, y = rng.uniform(0, width, _TRIES), rng.uniform(0, height, _TRIES)
    ok = np.flatnonzero(_fits(cell, x, y, width, height) & _clear_of(cell, x, y, placed, gap))
    if not len(ok):
        return False
    _set_centre(cell, float(x[ok[0]]), float(y[ok[0]]))
    return True


def _place_at_edge(
    rng: np.random.Generator, cell: _WhiteCell, placed: list[_WhiteCell], width: int, height: int, gap: float
) -> bool:
    """Centroid up to 0.6 radius inside one side: the edge cuts off about a quarter to a half of the cell."""
    side = rng.integers(4, size=_TRIES)
    depth = rng.uniform(0.0, 0.6, _TRIES) * cell.radius
    along_x, along_y = rng.uniform(cell.reach, width - cell.reach, _TRIES), rng.uniform(0, height, _TRIES)
    along_y = np.clip(along_y, cell.reach, height - cell.reach)
    x = np.select([side == 0, side == 1], [depth, width - depth], along_x)
    y = np.select([side == 2, side == 3], [depth, height - depth], along_y)
    ok = np.flatnonzero(_clear_of(cell, x, y, placed, gap))
    if not len(ok):
        return False
    _set_centre(cell, float(x[ok[0]]), float(y[ok[0]]))
    cell.edge = True
    return True


def _overlap(a: _WhiteCell, b: _WhiteCell) -> int:
    """Pixels that both cells' masks cover at their current positions."""
    ha, wa = a.alpha.shape
    hb, wb = b.alpha.shape
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1, y1 = min(a.x0 + wa, b.x0 + wb), min(a.y0 + ha, b.y0 + hb)
    if x1 <= x0 or y1 <= y0:
        return 0
    ma = a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    mb = b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(ma & mb))


def _place_touching(
    rng: np.random.Generator,
    cell: _WhiteCell,
    anchor: _WhiteCell,
    placed: list[_WhiteCell],
    width: int,
    height: int,
    gap: float,
) -> bool:
    """Put cell against anchor: the nearest distance along a random direction at which their masks just meet."""
    ax, ay = anchor.centre
    others = [p for p in placed if p is not anchor]
    for angle in rng.uniform(0, 2 * math.pi, 24):
        dx, dy = math.cos(angle), math.sin(angle)
        lo, hi = 0.3 * (anchor.radius + cell.radius), anchor.reach + cell.reach + 2.0
        for _ in range(10):  # smallest distance with no overlap, to a pixel
            mid = 0.5 * (lo + hi)
            _set_centre(cell, ax + mid * dx, ay + mid * dy)
            if _overlap(anchor, cell):
                lo = mid
            else:
                hi = mid
        x, y = np.array([ax + hi * dx]), np.array([ay + hi * dy])  # in contact: the outlines meet, no overlap
        if _fits(cell, x, y, width, height)[0] and _clear_of(cell, x, y, others, gap)[0]:
            _set_centre(cell, float(x[0]), float(y[0]))
            return True
    return False


def _visible_centroid(cell: _WhiteCell, width: int, height: int) -> tuple[float, float]:
    """The coverage-weighted centroid of the part of the cell inside the field, in field pixels."""
    h, w = cell.alpha.shape
    xs0, ys0 = max(0, -cell.x0), max(0, -cell.y0)
    xs1, ys1 = min(w, width - cell.x0), min(h, height - cell.y0)
    part = cell.alpha[ys0:ys1, xs0:xs1]
    yy, xx = np.mgrid[ys0:ys1, xs0:xs1]
    total = float(part.sum())
    return cell.x0 + float((part * xx).sum() / total), cell.y0 + float((part * yy).sum() / total)


def _as_imaged(image: np.ndarray, cell: _WhiteCell, centroid: tuple[float, float], um_per_px: float) -> np.ndarray:
    """The cell as the field shows it, cut by its true outline: a perfect segmentation's C-NMC-style crop.

    The field's own pixels inside the cell's mask (its pale cytoplasm, red cells lying over it, noise), black
    outside, at SYNTH_UM_PER_PX, centred on the visible part's centroid: what the worker's cut of this cell would
    be if its segmentation were exact, so fields against crops measures segmentation, scale and cutting alone.
    """
    height, width = image.shape[:2]
    h, w = cell.alpha.shape
    xs0, ys0 = max(0, -cell.x0), max(0, -cell.y0)
    xs1, ys1 = min(w, width - cell.x0), min(h, height - cell.y0)
    mask = cell.mask[ys0:ys1, xs0:xs1]
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    fx0, fy0 = cell.x0 + xs0 + x0, cell.y0 + ys0 + y0
    found = FoundCell(
        index=0,
        bbox=(fx0, fy0, fx0 + x1 - x0, fy0 + y1 - y0),
        centroid=centroid,
        area_um2=float(mask.sum()) * um_per_px**2,
        kind="lymphoid",
        edge=cell.edge,
        mask=mask[y0:y1, x0:x1],
    )
    return cut_cell(image, found, field_um_per_px=um_per_px, target_um_per_px=SYNTH_UM_PER_PX, size=CROP_SIZE)


def _composite(field: np.ndarray, cell: _WhiteCell) -> None:
    """Lay the cell over field, channel-first (premultiplied 'over'), clipped to the field."""
    height, width = field.shape[1:]
    h, w = cell.alpha.shape
    xs0, ys0 = max(0, -cell.x0), max(0, -cell.y0)
    xs1, ys1 = min(w, width - cell.x0), min(h, height - cell.y0)
    if xs1 <= xs0 or ys1 <= ys0:
        return
    region = field[:, cell.y0 + ys0 : cell.y0 + ys1, cell.x0 + xs0 : cell.x0 + xs1]
    opacity = cell.opacity[ys0:ys1, xs0:xs1]
    region[...] = cell.colour[:, ys0:ys1, xs0:xs1] + (1.0 - opacity)[None] * region


def _add_red_cells(
    rng: np.random.Generator, under: np.ndarray, over: np.ndarray, whites: list[_WhiteCell], um_per_px: float
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
        x = rng.uniform(-r * 0.6, width + r * 0.6, _TRIES)
        y = rng.uniform(-r * 0.6, height + r * 0.6, _TRIES)
        # Red cells mostly lie side by side (about a tenth overlapping a neighbour by up to half).
        squeeze = 0.55 if rng.random() < 0.12 else 0.92
        ok = np.ones(_TRIES, bool)
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


def _add_platelets(
    rng: np.random.Generator, layer: np.ndarray, whites: list[_WhiteCell], um_per_px: float, count: int
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


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], grain: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with about `grain` blobs across, upscaled smoothly to shape."""
    coarse = rng.standard_normal((grain, grain)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


def _vignette(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Illumination falling off gently from a point near the centre."""
    strength = rng.uniform(*VIGNETTE)
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    norm = (width / 2) ** 2 + (height / 2) ** 2
    x = ((np.arange(width, dtype=np.float32) - cx) ** 2)[None, :]
    y = ((np.arange(height, dtype=np.float32) - cy) ** 2)[:, None]
    return 1.0 - strength * np.minimum((x + y) / norm, 1.5)

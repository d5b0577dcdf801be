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

The white cells are drawn by trainer.white_cells and the smear around them by trainer.smear; this module places
the white cells, composes the fields and writes them with their truth.

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

from trainer.dataset import CLASS_NAMES, DatasetError
from trainer.smear import (
    BACKGROUND_RGB,
    NOISE_SIGMA,
    PLATELET_OD,
    PLATELETS_PER_RBC,
    RBC_OD,
    add_platelets,
    add_red_cells,
    smooth_noise,
    vignette,
)
from trainer.synth import subject_tint
from trainer.white_cells import CYTOPLASM_OPACITY, TRIES, WhiteCell, as_imaged, composite, visible_centroid, white_cell

log = logging.getLogger(__name__)

TRUTH_COLUMNS = ("field", "index", "x", "y", "radius_px", "diameter_um", "label", "edge", "um_per_px", "crop")

# --- White cells ------------------------------------------------------------------------------------
EDGE_PROBABILITY = 0.06  # a white cell is placed cut by the field's edge
WHITE_GAP_UM = 2.0  # least gap between white cells that are not placed touching


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
            x, y = visible_centroid(cell, width, height)
            if crops:
                crop_name = f"crops/{label}/cell_{len(rows) + 1:04d}.bmp"
                Image.fromarray(as_imaged(image, cell, (x, y), scale)).save(out / crop_name, "BMP")
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
) -> tuple[np.ndarray, list[WhiteCell]]:
    """One field as (height, width, 3) uint8 RGB and the white cells placed in it (fewer when they do not fit)."""
    whites = [
        white_cell(rng, bool(rng.random() < all_fraction), tint, um_per_px, cytoplasm_opacity) for _ in range(cells)
    ]
    placed = _place_white_cells(rng, whites, width, height, um_per_px, touching)

    under = np.zeros((height, width), np.float32)  # red-cell thickness below the white cells
    over = np.zeros((height, width), np.float32)  # ... and above them
    add_red_cells(rng, under, over, placed, um_per_px)
    platelets = np.zeros((height, width), np.float32)
    n_platelets = int(rng.poisson(max(1.0, float(over.size) * um_per_px**2 / 44.0 * 0.4 * PLATELETS_PER_RBC)))
    add_platelets(rng, platelets, placed, um_per_px, n_platelets)

    # Channel-first (3, height, width) float32 from here: whole-field arithmetic on contiguous planes.
    paper = (BACKGROUND_RGB * (1.0 + 0.015 * rng.standard_normal(3))).astype(np.float32)
    smear = 1.0 + 0.025 * smooth_noise(rng, (height, width), 6)  # uneven smear thickness
    field = np.empty((3, height, width), np.float32)
    for c in range(3):
        od = under * np.float32(RBC_OD[c]) + platelets * np.float32(PLATELET_OD[c])
        field[c] = paper[c] * smear * np.exp(-od)
    for cell in placed:
        composite(field, cell)
    covered = over > 0
    if covered.any():
        field[:, covered] *= np.exp(-over[covered][None, :] * RBC_OD.astype(np.float32)[:, None])
    field *= vignette(rng, height, width)[None]
    noise = np.frombuffer(rng.bytes(2 * field.size), np.uint8).reshape(2, *field.shape)
    field += (noise[0].astype(np.float32) + noise[1] - 254.5) * np.float32(NOISE_SIGMA / 104.0)  # triangular
    return np.clip(field + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy(), placed


def _place_white_cells(
    rng: np.random.Generator, cells: list[WhiteCell], width: int, height: int, um_per_px: float, touching: float
) -> list[WhiteCell]:
    """Place cells: some in touching pairs, a few cut by the edge, the rest apart; drops those that do not fit."""
    gap = WHITE_GAP_UM / um_per_px
    n_pairs = int(rng.binomial(len(cells) // 2, touching))
    placed: list[WhiteCell] = []
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


def _clear_of(cell: WhiteCell, x: np.ndarray, y: np.ndarray, others: list[WhiteCell], gap: float) -> np.ndarray:
    """Which candidate centroids (x, y) keep cell at least gap away from every other white cell."""
    ok = np.ones(x.shape, bool)
    for other in others:
        ox, oy = other.centre
        ok &= np.hypot(x - ox, y - oy) > cell.reach + other.reach + gap
    return ok


def _set_centre(cell: WhiteCell, x: float, y: float) -> None:
    cell.x0, cell.y0 = round(x - cell.cx), round(y - cell.cy)


def _fits(cell: WhiteCell, x: np.ndarray, y: np.ndarray, width: int, height: int, margin: int = 4) -> np.ndarray:
    h, w = cell.alpha.shape
    left, top = np.round(x - cell.cx), np.round(y - cell.cy)
    return (left >= margin) & (top >= margin) & (left + w <= width - margin) & (top + h <= height - margin)


def _place_apart(
    rng: np.random.Generator, cell: WhiteCell, placed: list[WhiteCell], width: int, height: int, gap: float
) -> bool:
    x, y = rng.uniform(0, width, TRIES), rng.uniform(0, height, TRIES)
    ok = np.flatnonzero(_fits(cell, x, y, width, height) & _clear_of(cell, x, y, placed, gap))
    if not len(ok):
        return False
    _set_centre(cell, float(x[ok[0]]), float(y[ok[0]]))
    return True


def _place_at_edge(
    rng: np.random.Generator, cell: WhiteCell, placed: list[WhiteCell], width: int, height: int, gap: float
) -> bool:
    """Centroid up to 0.6 radius inside one side: the edge cuts off about a quarter to a half of the cell."""
    side = rng.integers(4, size=TRIES)
    depth = rng.uniform(0.0, 0.6, TRIES) * cell.radius
    along_x, along_y = rng.uniform(cell.reach, width - cell.reach, TRIES), rng.uniform(0, height, TRIES)
    along_y = np.clip(along_y, cell.reach, height - cell.reach)
    x = np.select([side == 0, side == 1], [depth, width - depth], along_x)
    y = np.select([side == 2, side == 3], [depth, height - depth], along_y)
    ok = np.flatnonzero(_clear_of(cell, x, y, placed, gap))
    if not len(ok):
        return False
    _set_centre(cell, float(x[ok[0]]), float(y[ok[0]]))
    cell.edge = True
    return True


def _overlap(a: WhiteCell, b: WhiteCell) -> int:
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
    cell: WhiteCell,
    anchor: WhiteCell,
    placed: list[WhiteCell],
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

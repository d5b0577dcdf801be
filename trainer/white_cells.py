"""The white cells of a synthetic field (THE DATA IS SYNTHETIC): trainer.synth's C-NMC-like cells drawn at the
crops' scale and rescaled to the field's, with the cytoplasm made a paler, partly see-through layer; laying one over
the field; and, once the field is made, where its visible part lies and its crop as a perfect segmentation would cut
it. Where the cells go in a field is trainer.synth_fields'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.cut import cut_cell
from core.segment import FoundCell
from trainer.synth import SYNTH_UM_PER_PX, render_cell_layers

CROP_SIZE = 450
CYTOPLASM_OPACITY = 0.45  # the cytoplasm's colour over the background's: lilac on a smear, not the crops' purple
TRIES = 96  # candidate positions drawn at once for each cell placed (white cells, and red cells in trainer.smear)


@dataclass
class WhiteCell:
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


def white_cell(
    rng: np.random.Generator,
    malignant: bool,
    tint: np.ndarray | None,
    um_per_px: float,
    cytoplasm_opacity: float = CYTOPLASM_OPACITY,
) -> WhiteCell:
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
    return WhiteCell(malignant, colour, cover, opacity, cx, cy, math.sqrt(total / math.pi), reach)


def visible_centroid(cell: WhiteCell, width: int, height: int) -> tuple[float, float]:
    """The coverage-weighted centroid of the part of the cell inside the field, in field pixels."""
    h, w = cell.alpha.shape
    xs0, ys0 = max(0, -cell.x0), max(0, -cell.y0)
    xs1, ys1 = min(w, width - cell.x0), min(h, height - cell.y0)
    part = cell.alpha[ys0:ys1, xs0:xs1]
    yy, xx = np.mgrid[ys0:ys1, xs0:xs1]
    total = float(part.sum())
    return cell.x0 + float((part * xx).sum() / total), cell.y0 + float((part * yy).sum() / total)


def as_imaged(image: np.ndarray, cell: WhiteCell, centroid: tuple[float, float], um_per_px: float) -> np.ndarray:
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


def composite(field: np.ndarray, cell: WhiteCell) -> None:
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

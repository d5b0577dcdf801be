"""Find the white (nucleated) cells in a microscope field of a stained blood or marrow smear.

Pure numpy / scipy.ndimage / scikit-image / Pillow, with OpenCV's pixel primitives through core.morph; no model, no
weights. Used by the trainer and the worker.

Method. Every size is in um, converted through the field's um per pixel, so the same cells at another
magnification give the same result.

1. Scale: the caller's ``um_per_px`` ("given"); else :func:`estimate_um_per_px` ("estimated") from the red cells:
   on a copy about ``_EST_SIDE`` px long, red-cell pixels are the denser (Otsu) non-nucleus pixels with pale centres
   filled; masses thicker than ``_RBC_THICK`` times the typical clump are left out (fused cells, rings of cells around
   a gap); the 90th percentile of the distance map gives the red-cell radius even where cells touch (a disk of
   radius R has 90 % of its pixels within 0.684 R of its edge), divided by ``_RBC_DIAM_READ`` (what that reading
   gives of the true diameter on synthetic slides of known scale, where touching and overlapping cells thin the
   map: 0.965, which leaves seven synthetic slides' estimates 0.7 % high on average, -2 to +3 % each, and puts
   BCCD's neutrophils at a median 12.4 um and its lymphocytes at 9.3 um, textbook sizes; calibrated on BCCD's
   hand-drawn boxes, which circumscribe the cells loosely, it read slides 4-11 % low); the diameter is
   ``RBC_DIAMETER_UM``. With under
   ``_RBC_MIN_COUNT`` cells' worth of red pixels, or no bright background, it is None and ``CNMC_UM_PER_PX`` is
   assumed ("default").
2. Detection runs on a copy shrunk by a whole factor to about ``_WORK_UM`` um per pixel. Colour is optical density
   against the field's background (its brightest pixels; white when it has none, e.g. a black-backed C-NMC crop);
   near-black pixels are "no specimen", never stain. The stain score is OD(green) - OD(blue): high in Romanowsky
   nuclei, near zero in red cells (eosin absorbs green and blue alike) and on background.
3. Nuclei: stain score above ``NUC_SCORE``; lobes closer than ``_LOBE_GAP_UM`` are one nucleus (neutrophil lobes)
   unless together they exceed ``_MAX_NUC_UM2`` (two cells side by side). Cytoplasm: within ``_CYTO_REACH_UM`` of a
   nucleus's convex hull, pixels with stain score above ``_CYTO_SCORE`` (pale blue/lilac) or denser than the field's
   red cells (pale, non-bluish cytoplasm). A watershed on that mask's distance map, seeded by the nuclei, splits
   touching white cells. Two whose nuclei came within the lobe gap (scant-cytoplasm blasts) are one seed, one region:
   a region over ``_PAIR_ROUNDNESS`` times the disc of its deepest point is cut at the maxima of its distance map
   standing ``_PAIR_SADDLE_UM`` above their saddles; parts meeting along no neck (``_PAIR_NECK``) or across over
   ``_PAIR_CUT_UM`` of nucleus rejoin, and it splits only into parts each with a solid nucleus (``_PAIR_NUC_UM2``,
   ``_PAIR_SOLIDITY``: two round blast nuclei, not a neutrophil's bent lobes). The mask comes back to full
   resolution smoothly (bilinear), without near-black pixels.
4. Rejected: nuclei under ``_MIN_NUC_UM2`` (platelets, debris), cells under ``_MIN_CELL_UM2``. A cell touching the
   field's border is kept and marked ``edge``.
5. Outline: each cell's outline is redrawn at full resolution within ``_EDGE_BAND_UM`` of the detected one, where
   the mean optical density crosses ``_EDGE_LEVEL`` of the way from the density just outside it (``_EDGE_OUTER_UM``,
   median) to just inside it (``_EDGE_INNER_UM``, median); other cells' regions and near-black pixels are never
   taken. The working-scale outline alone lost the faint rim of wide pale cytoplasm and overgrew cells with scant
   cytoplasm, and the model reads a cell's size: bench/README.md ("Microscope fields") has what that did to a
   slide's ALL fraction and how the level was chosen.

The kind of each cell found, lymphoid or other, is core.cellkind's rule.

C-NMC scale (``CNMC_UM_PER_PX``): C-NMC does not publish it. The 24 real cells of cnmc-sample have a whole-cell
equivalent diameter (non-black mask) of median 199 px (hem, normal B-lymphoid; 162-239 px) and 232 px (all,
lymphoblasts; 206-252 px). Textbook sizes (Bain, *Blood Cells: A Practical Guide*, 5th ed.; Hoffbrand's *Essential
Haematology*): small mature lymphocytes 7-10 um, lymphoblasts 10-18 um (FAB L1, the common childhood form, up to
twice a small lymphocyte). hem at 7-10 um needs 0.035-0.050 um/px; all at 10-18 um needs 0.043-0.078 um/px; the
overlap is 0.043-0.050, and we take 0.046 (hem median 9.2 um, blasts median 10.7 um; a 450 px crop is 20.7 um).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from core import morph
from core.cellkind import cell_kind
from core.errors import AllscoreError
from core.stain import NEAR_BLACK, NUC_SCORE, percentile, shrink, stain

RBC_DIAMETER_UM = 7.5
CNMC_UM_PER_PX = 0.046

_WORK_UM = 0.3  # detection scale, um per pixel of the shrunk copy
_CYTO_SCORE = 0.13  # stain score of bluish cytoplasm (nuclei: core.stain.NUC_SCORE)
_CYTO_DENS = 0.15  # mean OD of pale cytoplasm, at least; and above the field's red cells' 75th percentile + 0.05
_RBC_DENS_PCT, _RBC_DENS_MARGIN = 75, 0.05
_CYTO_REACH_UM = 5.0  # cytoplasm lies within this of its nucleus's convex hull
_LOBE_GAP_UM = 1.2  # lobes closer than this are one nucleus...
_MAX_NUC_UM2 = 120.0  # ... unless together they are larger than any one nucleus
_MIN_NUC_UM2, _MIN_CELL_UM2 = 10.0, 20.0  # smaller: platelets, debris
_PAIR_ROUNDNESS = 1.75  # a region over this times the disc of its deepest point's radius may be two cells
_PAIR_SADDLE_UM = 0.6  # ... split where two maxima of its distance map stand this far above the saddle between them
_PAIR_MIN_R_UM, _PAIR_NUC_UM2 = 2.5, 12.0  # ... each maximum this deep and each part with this much nucleus
_PAIR_SOLIDITY = 0.87  # ... and each part's nucleus a solid body (area over its convex hull's), not a bent lobe
_PAIR_NECK, _PAIR_CUT_UM = 0.95, 2.8  # ... where they meet along a neck (diameters) crossing this much nucleus, at most
_SPUR_UM = 2.5  # a cell's region loses parts thinner than this (cytoplasm leaking into a red cell)
_EST_SIDE = 256  # the scale estimate looks at a copy about this many pixels on its longer side
_RBC_MIN_COUNT = 3  # cells' worth of red pixels needed for an estimate
_RBC_THICK = 1.6  # masses thicker than this times the typical clump are left out of the estimate
_RBC_DIAM_READ = 0.965  # what the distance map reads of the red cells' diameter (synthetic slides of known scale)
_EDGE_BAND_UM = 0.3  # the outline is redrawn at full resolution within this of the detected one, either side...
_EDGE_INNER_UM, _EDGE_OUTER_UM = (0.15, 0.45), (0.3, 0.6)  # ... between the density just inside it and outside it
_EDGE_LEVEL = 0.7  # ... where the density crosses this fraction of the way from outside to inside
_EDGE_MIN_CONTRAST = 0.03  # ... when inside is at least this denser than outside (mean OD); else it stays
_LOG1P = np.log(np.arange(256, dtype=np.float32) + np.float32(1.0))  # log(v + 1) of each 8-bit value


class SegmentationError(AllscoreError):
    """A field that is not an (H, W, 3) uint8 RGB array, or a scale that is not a positive number."""


@dataclass(frozen=True)
class FoundCell:
    """One white cell; coordinates in field pixels, bbox end-exclusive, mask the whole cell inside bbox."""

    index: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area_um2: float
    kind: str
    edge: bool
    mask: np.ndarray


@dataclass(frozen=True)
class FieldSegmentation:
    """The cells of one field (reading order), its scale and where the scale came from (given/estimated/default)."""

    cells: tuple[FoundCell, ...]
    um_per_px: float
    scale_source: str
    height: int
    width: int


def check_rgb(rgb: object) -> NDArray[np.uint8]:
    """The array, if it is an (H, W, 3) uint8 RGB image; SegmentationError saying what it is otherwise."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        desc = f"{type(rgb).__name__} {getattr(rgb, 'shape', '')} {getattr(rgb, 'dtype', '')}".strip()
        raise SegmentationError(f"a field must be an (H, W, 3) uint8 RGB array, got {desc}; convert it to RGB uint8")
    return rgb


def _label_max(values: NDArray[np.generic], lab: NDArray[np.int32], n: int) -> NDArray[np.float64]:
    """The maximum of ``values`` over each label 1..n (ndimage.maximum sorts the whole image; this does not)."""
    out = np.zeros(n, np.float64)
    for i, sl in enumerate(ndi.find_objects(lab, n)):
        if sl is not None:
            out[i] = float(values[sl][lab[sl] == i + 1].max())
    return out


def estimate_um_per_px(rgb: np.ndarray) -> float | None:
    """um per pixel from the typical red-cell diameter (``RBC_DIAMETER_UM``); None if too few red cells are seen."""
    rgb = check_rgb(rgb)
    if min(rgb.shape[:2]) < 16:
        return None
    f = max(1, math.ceil(max(rgb.shape[:2]) / _EST_SIDE))
    diam = _rbc_diameter(shrink(rgb, f))
    if diam is not None and diam < 16 and f > 1:  # red cells too small in the shrunk copy: look closer
        f = max(1, int(f * diam / 24))
        diam = _rbc_diameter(shrink(rgb, f))
    return None if diam is None else RBC_DIAMETER_UM / (diam * f)


def _rbc_diameter(img: NDArray[np.float32]) -> float | None:
    """Red-cell diameter in pixels of ``img`` (module docstring, step 1)."""
    from skimage.filters import threshold_otsu

    if min(img.shape[1:]) < 8:
        return None
    score, dens, specimen, bg = stain(img)
    if bg is None:
        return None  # no bright background: no red cells to measure (e.g. a C-NMC crop)
    vals = dens[specimen]
    if vals.size < 64 or float(vals.max() - vals.min()) < 0.05:
        return None
    found = _red_diameter(specimen & (dens > threshold_otsu(vals)) & (score < NUC_SCORE))
    if found is not None:
        return found
    # With several dark white cells in a field (a leukaemic smear), Otsu over every pixel splits nuclei from the
    # rest and leaves no red cell: then the threshold is taken over the pixels that are not nucleus.
    rest = dens[specimen & (score < NUC_SCORE)]
    if rest.size < 64 or float(rest.max() - rest.min()) < 0.05:
        return None
    return _red_diameter(specimen & (dens > threshold_otsu(rest)) & (score < NUC_SCORE))


def _red_diameter(red: NDArray[np.bool_]) -> float | None:
    """The red-cell diameter in pixels from a mask of red-cell pixels (None if too few cells in it)."""
    red = morph.fill_holes(morph.opening(red, morph.disk(1.5)))
    edt = morph.distance(red)
    # leave out masses thicker than the typical red-cell clump (1.6x its area-weighted median inscribed radius):
    # red cells fused into a mass, or a ring of red cells around a gap that filling holes turned into a disk
    lab, n = morph.label(red)
    if n == 0:
        return None
    r = _label_max(edt, lab, n)
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64)
    order = np.argsort(r)
    cum = np.cumsum(area[order])
    r_med = float(r[order][np.searchsorted(cum, cum[-1] / 2)])
    keep = np.zeros(n + 1, bool)
    keep[1:] = r <= _RBC_THICK * r_med
    return _p90_diameter(edt[keep[lab] & red], _RBC_MIN_COUNT)


def _p90_diameter(e: NDArray[np.floating[Any]], min_cells: int) -> float | None:
    if e.size < 64:
        return None
    diam = 2.0 * float(np.percentile(e, 90)) / 0.684 / _RBC_DIAM_READ
    if diam < 3 or e.size < min_cells * math.pi * diam * diam / 4:
        return None
    return diam


def segment_field(rgb: np.ndarray, *, um_per_px: float | None = None) -> FieldSegmentation:
    """Find the white cells of one field; see the module docstring for the method, core.cellkind for the kind rule."""
    rgb = check_rgb(rgb)
    height, width = rgb.shape[:2]
    if um_per_px is not None:
        try:
            scale, source = float(um_per_px), "given"
        except (TypeError, ValueError):
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise SegmentationError(f"um_per_px must be a positive number of micrometres per pixel, got {um_per_px!r}")
    else:
        est = estimate_um_per_px(rgb) if min(height, width) >= 8 else None
        scale, source = (est, "estimated") if est is not None else (CNMC_UM_PER_PX, "default")
    k = max(1, round(_WORK_UM / scale))
    if height // k < 4 or width // k < 4:
        return FieldSegmentation((), scale, source, height, width)
    img = shrink(rgb, k)
    wum = scale * k  # um per working pixel
    px_area = wum * wum
    score, dens, specimen, bg = stain(img)
    bg_log = np.log(np.asarray(bg or [255.0, 255.0, 255.0], np.float32) + np.float32(1.0))
    raw_score = score
    score = morph.mean3(score) if wum < 0.45 else score

    nuc = (score > NUC_SCORE) & specimen
    nuc = morph.opening(nuc, morph.disk(0.6 / wum)) if 0.6 / wum >= 1 else nuc
    if not nuc.any():
        return FieldSegmentation((), scale, source, height, width)
    markers = _nucleus_markers(nuc, wum)

    near = morph.distance(~morph.hulls(markers)) * wum <= _CYTO_REACH_UM  # cytoplasm's reach
    cand = (((score > _CYTO_SCORE) | (dens > _cyto_density(score, dens, specimen & ~near))) & specimen & near) | nuc
    cand = morph.fill_holes(morph.opening(cand, morph.disk(max(1.0, 0.8 / wum))) | nuc)
    elev = -morph.distance(cand)
    labels = _flood(elev, markers, nuc, cand)
    objs = _split_pairs(labels, -elev, nuc, wum)

    hw, ww = labels.shape
    found: list[tuple[float, float, dict[str, object]]] = []
    for lab_id, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        reg = morph.fill_holes(labels[sl] == lab_id)
        nreg = nuc[sl] & reg
        if float(nreg.sum()) * px_area < _MIN_NUC_UM2 or float(reg.sum()) * px_area < _MIN_CELL_UM2:
            continue
        reg = _smooth_region(reg, nreg, wum)  # the outline, once the region is known to be a cell
        edge = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == hw or sl[1].stop == ww
        fy0, fx0 = sl[0].start * k, sl[1].start * k
        fy1 = height if sl[0].stop == hw else min(height, sl[0].stop * k)
        fx1 = width if sl[1].stop == ww else min(width, sl[1].stop * k)
        full = _upsample(reg, k, fy1 - fy0, fx1 - fx0)
        sub = rgb[fy0:fy1, fx0:fx1]
        brightest = np.maximum(np.maximum(sub[..., 0], sub[..., 1]), sub[..., 2])  # (max over axis 2: 20x slower)
        if int(brightest.min()) <= NEAR_BLACK:  # a near-black pixel (a black-backed crop given as a field): no specimen
            full &= brightest > NEAR_BLACK
        if not full.any():
            continue
        full, fy0, fx0 = _refine_outline(rgb, full, fy0, fx0, labels, lab_id, k, bg_log, scale)
        ys, xs = np.nonzero(full)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        mask = full[y0:y1, x0:x1].copy()
        kind = cell_kind(raw_score[sl], dens[sl], reg, wum * wum)
        cy, cx = float(ys.mean()) + fy0, float(xs.mean()) + fx0
        info = {
            "bbox": (x0 + fx0, y0 + fy0, x1 + fx0, y1 + fy0),
            "area_um2": float(mask.sum()) * scale * scale,
            "kind": kind,
            "edge": bool(edge or fy0 + y0 == 0 or fx0 + x0 == 0 or fy0 + y1 == height or fx0 + x1 == width),
            "mask": mask,
        }
        found.append((cy, cx, info))
    found.sort(key=lambda t: (t[0], t[1]))
    cells = tuple(
        FoundCell(index=i, centroid=(cx, cy), **info)  # type: ignore[arg-type]
        for i, (cy, cx, info) in enumerate(found)
    )
    return FieldSegmentation(cells, scale, source, height, width)


def _flood(
    elev: NDArray[np.float32], markers: NDArray[np.int32], nuc: NDArray[np.bool_], cand: NDArray[np.bool_]
) -> NDArray[np.int32]:
    """``watershed(elev, markers, mask=cand)`` (``nuc``: where ``markers`` is not 0), run only on the parts of the
    mask that hold two nuclei or more.

    Flooding never crosses from one 4-connected part of the mask to another, so a part with one nucleus is that
    nucleus's whole and one with none stays 0; in a part with several, the flood meets ties in the same order as
    over the whole field (its pixels keep their raster order), so the labels are the same, at half the cost of
    flooding the field.
    """
    parts, n = morph.label(cand)
    at = np.flatnonzero(nuc)  # nuclei lie within the mask
    part, mark = parts.ravel()[at].astype(np.int64), markers.ravel()[at].astype(np.int64)
    span = int(mark.max(initial=0)) + 1
    pairs = np.unique(part * span + mark)  # each (part, nucleus) once
    part, mark = pairs // span, pairs % span
    nuclei = np.bincount(part, minlength=n + 1)
    lut = np.zeros(n + 1, np.int32)
    one = nuclei[part] == 1
    lut[part[one]] = mark[one]
    shared = []  # (bbox, pixels) of each part with several nuclei
    for q in np.flatnonzero(nuclei > 1).tolist():
        inside = parts == q
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        sl = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        shared.append((sl, inside[sl]))
    masked = np.flatnonzero(cand)
    np.put(parts, masked, lut[parts.ravel()[masked]])  # relabelled in place: outside the mask stays 0
    labels = parts
    for sl, inside in shared:
        flooded = watershed(elev[sl], np.where(inside, markers[sl], 0), mask=inside)
        labels[sl][inside] = flooded[inside]
    return labels


def _cyto_density(score: NDArray[np.float32], dens: NDArray[np.float32], far: NDArray[np.bool_]) -> float:
    """Pale cytoplasm that is not bluish still counts where it is denser than the field's red cells (the dense,
    non-bluish pixels away from any nucleus): above their 75th percentile plus a margin, or _CYTO_DENS if few."""
    pop = far & (score < _CYTO_SCORE) & (dens > 0.08)
    n = int(pop.sum())
    if n < 0.02 * max(1, int(far.sum())) or n < 16:
        return _CYTO_DENS
    return max(_CYTO_DENS, percentile(dens[pop], _RBC_DENS_PCT) + _RBC_DENS_MARGIN)


def _nucleus_markers(nuc: NDArray[np.bool_], wum: float) -> NDArray[np.int32]:
    """One label per nucleus: lobes closer than ``_LOBE_GAP_UM`` join, unless together they are larger than any one
    nucleus (``_MAX_NUC_UM2``: two white cells side by side), when each solid part stays its own."""
    comps, nc = morph.label(nuc)
    groups, ng = morph.label(morph.dilation(nuc, morph.disk(max(1.0, _LOBE_GAP_UM / 2 / wum))))
    idx = np.arange(1, nc + 1)
    at = np.flatnonzero(nuc)  # nucleus pixels (a few per cent of the field)
    of = comps.ravel()[at]
    comp_group = np.zeros(nc + 1, np.int64)
    comp_group[of] = groups.ravel()[at]  # a nucleus lies within one group: any of its pixels names it
    comp_group = comp_group[1:]
    comp_area = np.bincount(of, minlength=nc + 1)[1:] * (wum * wum)
    group_area = np.bincount(comp_group, weights=comp_area, minlength=ng + 1)
    big = group_area[comp_group] > _MAX_NUC_UM2
    lut = np.zeros(nc + 1, np.int32)
    lut[1:] = np.where(big, ng + idx, comp_group)
    np.put(comps, at, lut[of])  # relabelled in place: the background (most of the field) stays 0
    return comps


def _split_pairs(
    labels: NDArray[np.int32], dist: NDArray[np.float32], nuc: NDArray[np.bool_], wum: float
) -> list[tuple[slice, slice] | None]:
    """Two touching white cells left as one region (their nuclei one marker) cut apart, in ``labels``: module
    docstring, step 3. Returns ``ndi.find_objects(labels)`` of the labels as they are then (the cut parts under new
    labels after the others), without a second pass over the field."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage.morphology import convex_hull_image, h_maxima

    objs: list[tuple[slice, slice] | None] = list(ndi.find_objects(labels))
    nxt = len(objs) + 1
    for lab_id in range(1, nxt):  # the regions as they came (not the parts cut from them)
        sl = objs[lab_id - 1]
        if sl is None or min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) * wum < 2 * _PAIR_MIN_R_UM:
            continue
        reg, nreg = labels[sl] == lab_id, nuc[sl]
        deep = float(dist[sl][reg].max())  # round cells: area 0.8-1.8 pi deep^2 (rough edges); two cells: 1.9-3.4
        if reg.sum() <= _PAIR_ROUNDNESS * math.pi * deep**2 or nreg[reg].sum() * wum**2 < 2 * _PAIR_NUC_UM2:
            continue
        d = ndi.distance_transform_edt(np.pad(reg, 1))
        peaks, npk = morph.label(h_maxima(d, _PAIR_SADDLE_UM / wum) & (d * wum >= _PAIR_MIN_R_UM))
        if npk < 2:
            continue
        parts = watershed(-d, peaks, mask=d > 0)[1:-1, 1:-1]
        u, v = _joins(parts, nreg, _label_max(d, peaks, npk), wum)
        merged = connected_components(coo_matrix((np.ones(u.size), (u, v)), shape=(npk + 1, npk + 1)))[1][parts] + 1
        merged[parts == 0] = 0
        big = np.flatnonzero(np.bincount(merged[nreg], minlength=npk + 2)[1:] * wum**2 >= _PAIR_NUC_UM2) + 1
        nucs = [(merged == g) & nreg for g in big]  # each a solid body, not a bent lobe
        if big.size < 2 or min(m.sum() / convex_hull_image(m).sum() for m in nucs) < _PAIR_SOLIDITY:
            continue
        sub = labels[sl]
        sub[parts > 0] = 0  # parts with little nucleus (a red cell beside, cytoplasm) go
        objs[lab_id - 1] = _box(sub == lab_id, sl)  # what is left of it (a part with no peak), if anything
        for g in big:
            sub[merged == g] = nxt
            objs.append(_box(merged == g, sl))
            nxt += 1
    return objs


def _box(mask: NDArray[np.bool_], sl: tuple[slice, slice]) -> tuple[slice, slice] | None:
    """The bounding box of ``mask`` (a window at ``sl``) in the field, as find_objects gives it; None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, x0 = sl[0].start, sl[1].start
    return (slice(y0 + int(rows[0]), y0 + int(rows[-1]) + 1), slice(x0 + int(cols[0]), x0 + int(cols[-1]) + 1))


def _joins(
    parts: NDArray[np.int32], nreg: NDArray[np.bool_], radius: NDArray[np.float64], wum: float
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The neighbouring parts (u, v) that are one cell: their common boundary is no neck (longer than ``_PAIR_NECK``
    of the smaller part's deepest diameter) or crosses over ``_PAIR_CUT_UM`` of nucleus."""
    n = radius.size + 1
    codes, nucs = [], []
    for a, b, na, nb in (
        (parts[1:], parts[:-1], nreg[1:], nreg[:-1]),
        (parts.T[1:], parts.T[:-1], nreg.T[1:], nreg.T[:-1]),
    ):
        m = (a != b) & (a > 0) & (b > 0)
        codes.append(np.minimum(a[m], b[m]).astype(np.int64) * n + np.maximum(a[m], b[m]))
        nucs.append((na & nb)[m])
    code, inv, total = np.unique(np.concatenate(codes), return_inverse=True, return_counts=True)
    crossed = np.bincount(inv, weights=np.concatenate(nucs), minlength=code.size)
    u, v = code // n, code % n
    one = (total > 2 * _PAIR_NECK * np.minimum(radius[u - 1], radius[v - 1])) | (crossed * wum > _PAIR_CUT_UM)
    return u[one], v[one]


def _smooth_region(reg: NDArray[np.bool_], nreg: NDArray[np.bool_], wum: float) -> NDArray[np.bool_]:
    """One cell's region (holes filled) without spurs thinner than ``_SPUR_UM`` (pale cytoplasm leaking into a red
    cell lying under or over it): an opening, then the part that holds the nucleus."""
    r = _SPUR_UM / 2 / wum
    if r < 1:
        return reg
    opened = morph.opening(reg, morph.disk(r)) | (nreg & reg)  # outside the slice is background
    comps, n = morph.label(opened)
    if n > 1:
        sizes = np.bincount(comps[nreg & opened], minlength=n + 1)
        sizes[0] = 0
        opened = comps == int(np.argmax(sizes)) if sizes.any() else opened
    return opened


def _refine_outline(
    rgb: NDArray[np.uint8],
    full: NDArray[np.bool_],
    fy0: int,
    fx0: int,
    labels: NDArray[np.int32],
    lab_id: int,
    k: int,
    bg_log: NDArray[np.float32],
    scale: float,
) -> tuple[NDArray[np.bool_], int, int]:
    """The cell's outline redrawn at full resolution (module docstring, step 5): the mask in a window padded around
    it, and the window's top-left (y, x) in the field. Other cells' regions are never taken."""
    height, width = rgb.shape[:2]
    pad = math.ceil(_EDGE_OUTER_UM[1] / scale) + 1
    y0, x0 = max(0, fy0 - pad), max(0, fx0 - pad)
    y1, x1 = min(height, fy0 + full.shape[0] + pad), min(width, fx0 + full.shape[1] + pad)
    m = np.zeros((y1 - y0, x1 - x0), bool)
    m[fy0 - y0 : fy0 - y0 + full.shape[0], fx0 - x0 : fx0 - x0 + full.shape[1]] = full
    win = rgb[y0:y1, x0:x1]
    rows = np.minimum(np.arange(y0, y1) // k, labels.shape[0] - 1)
    cols = np.minimum(np.arange(x0, x1) // k, labels.shape[1] - 1)
    near = labels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # each working pixel repeated over its field pixels
    near = near.repeat(np.bincount(rows - rows[0]), axis=0).repeat(np.bincount(cols - cols[0]), axis=1)
    specimen = np.maximum(np.maximum(win[..., 0], win[..., 1]), win[..., 2]) > NEAR_BLACK  # (max over axis 2: slower)
    free = ((near == 0) | (near == lab_id)) & specimen  # not another cell's, not black
    inside, outside = morph.distance(m), morph.distance(~m)
    lo, hi = max(1.0, _EDGE_INNER_UM[0] / scale), max(2.0, _EDGE_INNER_UM[1] / scale)
    ring_in = m & (inside >= lo) & (inside <= hi)
    lo, hi = max(1.0, _EDGE_OUTER_UM[0] / scale), max(2.0, _EDGE_OUTER_UM[1] / scale)
    around = ~m & (outside >= lo) & (outside <= hi)
    ring_out = around & free
    black = int((around & ~specimen).sum())
    if int(ring_in.sum()) < 8 or int(ring_out.sum()) < 8 or black > 0.25 * int(around.sum()):
        return m, y0, x0  # too small to read, or a cell on black (a crop given as a field): its outline is its own
    od = _LOG1P[win[..., 0]]  # mean optical density: mean of log(bg + 1) - log(v + 1) over the channels
    od += _LOG1P[win[..., 1]]
    od += _LOG1P[win[..., 2]]
    od *= np.float32(-1.0 / 3.0)
    od += np.float32(bg_log.mean())
    d_in, d_out = percentile(od[ring_in], 50), percentile(od[ring_out], 50)  # medians, by one partial sort
    if d_in - d_out < _EDGE_MIN_CONTRAST:
        return m, y0, x0
    band_px = max(1.0, _EDGE_BAND_UM / scale)
    band = (m & (inside <= band_px)) | (~m & free & (outside <= band_px))
    kept = m & ~band
    new = morph.fill_holes(kept | (band & (od > d_out + _EDGE_LEVEL * (d_in - d_out))))
    comps, n = morph.label(new)
    if n > 1:
        sizes = np.bincount(comps[kept], minlength=n + 1)
        sizes[0] = 0
        new = comps == int(np.argmax(sizes))
    return (new, y0, x0) if new.any() else (m, y0, x0)


def _upsample(reg: NDArray[np.bool_], k: int, h: int, w: int) -> NDArray[np.bool_]:
    """A working-scale mask at full resolution, with smooth edges: blurred over about a working pixel, resampled
    bilinearly and cut at one half (a blocky outline reads as an irregular cell, which the model takes for ALL)."""
    if k == 1:
        return reg[:h, :w].copy()
    big = morph.resize_linear(morph.soften(reg, 0.7), reg.shape[1] * k, reg.shape[0] * k)
    out = np.zeros((h, w), bool)
    arr = big[:h, :w] >= 128
    out[: arr.shape[0], : arr.shape[1]] = arr
    return out

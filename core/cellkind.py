"""The kind of a white cell found in a field, lymphoid or other.

Kind rule, measured on each cell in the detection copy (about core.segment's ``_WORK_UM`` um per pixel). The nucleus
is the cell's pixels stained more than halfway between the cell's 10th and 90th percentiles, in both stain score and
density (where the paler half's score is under ``_NUC_SPLIT`` of the other's: granular cytoplasm is stained too, and
the gaps between lobes are paler); else the fixed nucleus score. ``lymphoid`` when the nucleus is one body (no
second lobe of 2 um2 or more), solid (area over convex-hull area >= ``_LYMPH_SOLIDITY``) and at least ``_LYMPH_NC``
of the cell (nucleus-to-cell area); ``other`` otherwise: lobed or segmented nuclei (neutrophils, eosinophils),
folded or kidney-shaped nuclei (monocytes, bands) and cells mostly cytoplasm. Lymphocytes and lymphoblasts are
lymphoid. Known limits: monocytes with a round nucleus come out lymphoid (about 35 % of the typed test monocytes);
granule colour is not used.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from core import morph
from core.stain import NUC_SCORE, percentiles

LYMPHOID, OTHER = "lymphoid", "other"
_NUC_SPLIT = 0.55  # split nucleus from cytoplasm by the cell's own stain when the paler class is under this
_LYMPH_SOLIDITY, _LYMPH_NC = 0.86, 0.25


def _features(
    score: NDArray[np.float32], dens: NDArray[np.float32], cell: NDArray[np.bool_], px: float
) -> dict[str, float]:
    """What the kind rule reads of one cell, from the detection copy's stain score (before smoothing) and density;
    ``px`` is one pixel's area in um2: the nucleus's area, lobes and solidity, and the cell's area."""
    nuc = cell & (score > NUC_SCORE)
    v = score[cell]
    if v.size >= 16 and float(v.max() - v.min()) > 0.05:  # the nucleus is the more stained part, where distinct
        t = _halfway(v)
        sep = float(v[v <= t].mean()) / max(1e-3, float(v[v > t].mean()))
        if sep < _NUC_SPLIT:  # stained more than halfway, by both the stain score and the density
            nuc = cell & (score > max(t, NUC_SCORE)) & (dens > _halfway(dens[cell]))
    areas = morph.component_areas(nuc) * px
    nuc_area = float(nuc.sum()) * px
    cell_area = max(px, float(cell.sum()) * px)
    return {
        "nuc_um2": nuc_area,
        "cell_um2": cell_area,
        "nc": nuc_area / cell_area,
        "lobes": float(int((areas >= 2.0).sum())),
        "solidity": _solidity(nuc),
    }


def _solidity(mask: NDArray[np.bool_]) -> float:
    """Pixels over the area of their convex hull (the hull of the pixels' corners, as scikit-image's convex_hull_image
    takes it), from the hull's vertices alone: the hull is never rasterised."""
    n = int(np.count_nonzero(mask))
    if n == 0:
        return 0.0
    area = morph.corner_hull_area(mask)
    return min(1.0, n / area) if area > 0 else 1.0


def _halfway(v: NDArray[np.float32]) -> float:
    """Halfway between the 10th and 90th percentiles: between a cell's cytoplasm and its nucleus."""
    p10, p90 = percentiles(v, (10, 90))
    return (p10 + p90) / 2


def cell_kind(score: NDArray[np.float32], dens: NDArray[np.float32], cell: NDArray[np.bool_], px: float) -> str:
    """``lymphoid`` for one round solid nucleus filling most of the cell; ``other`` otherwise (see module doc)."""
    f = _features(score, dens, cell, px)
    if f["lobes"] <= 1 and f["solidity"] >= _LYMPH_SOLIDITY and f["nc"] >= _LYMPH_NC:
        return LYMPHOID
    return OTHER

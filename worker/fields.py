"""What one image of a sample becomes before the model sees it: a single cell, or the cells of a field.

Runs in the worker's I/O threads. A single-cell image is decoded to the model's input. A field is decoded whole,
segmented (core.segment), and each whole lymphoid cell is cut out C-NMC style (black outside its mask, centred)
at the scale the model was trained on and taken to the model's input size exactly as its crop would be; `other`
cells and cells cut by the field's edge are recorded, not scored. An image that cannot be read is one row with its
error; the rest of the sample goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from core.contract import FieldCell
from core.cut import cut_for_model
from core.imaging import DecodeError, decode_field, decode_image
from core.segment import FoundCell, SegmentationError, estimate_um_per_px, segment_field
from core.storage import ObjectNotFound, StorageError, StorageUnavailable, StoreDenied

Fetch = Callable[[str], bytes]

# Points kept of a cell's outline for the overlays (enough to draw it; a few hundred bytes a row).
OUTLINE_POINTS = 48


@dataclass
class Item:
    """One row to be: pixels for the model, or an error, or neither (a field's `other` or edge cell)."""

    image_uri: str
    image: np.ndarray | None = None
    error: str | None = None
    field: FieldCell | None = None


@dataclass
class Unit:
    """Everything one submitted image turned into."""

    uri: str
    items: list[Item] = field(default_factory=list)
    um_per_px: float | None = None
    scale_source: str | None = None
    error: str | None = None


def _fetch(uri: str, fetch: Fetch) -> bytes | str:
    """The bytes, or the reason there are none. A store that is down raises (the whole sample retries), and so
    does one that refuses (no such bucket, access denied, bad credentials: the whole sample fails)."""
    try:
        return fetch(uri)
    except (StorageUnavailable, StoreDenied):
        raise
    except ObjectNotFound:
        return f"not found: {uri}"
    except StorageError as exc:
        return str(exc)


def read_cell(uri: str, fetch: Fetch, *, size: int, max_pixels: int) -> Unit:
    """A single-cell image as one item at the model's size."""
    data = _fetch(uri, fetch)
    if isinstance(data, str):
        return Unit(uri, [Item(uri, error=data)], error=data)
    try:
        return Unit(uri, [Item(uri, image=decode_image(data, size, source=uri, max_pixels=max_pixels))])
    except DecodeError as exc:
        return Unit(uri, [Item(uri, error=exc.reason)], error=exc.reason)


def outline_json(cell: FoundCell) -> str:
    """The cell's outline in field pixels as JSON [[x, y], ...]: OUTLINE_POINTS points around its centroid.

    For each of OUTLINE_POINTS directions, the mask's farthest edge pixel that way (the outline of a star-shaped
    cell, which white cells are); a fraction of a millisecond, where tracing the contour cost over one per cell.
    """
    mask = cell.mask
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    ys, xs = np.nonzero(mask & ~inner)
    if xs.size == 0:
        return "[]"
    x0, y0 = cell.bbox[0], cell.bbox[1]
    dx, dy = xs + x0 + 0.5 - cell.centroid[0], ys + y0 + 0.5 - cell.centroid[1]
    sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * OUTLINE_POINTS).astype(np.int64) % OUTLINE_POINTS
    radius = np.hypot(dx, dy)
    order = np.lexsort((-radius, sector))  # by sector, farthest first
    ordered = sector[order]
    starts = np.ones(order.size, bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    first = order[starts]
    # Pixel centres are whole numbers and a half: written as json.dumps writes them, without its per-float cost.
    pairs = zip((xs[first] + x0).tolist(), (ys[first] + y0).tolist(), strict=True)
    return "[" + ",".join(f"[{x}.5,{y}.5]" for x, y in pairs) + "]"


# A slide is imaged at one magnification: its scale is estimated once, as the median over this many fields.
SCALE_FIELDS = 8


# The fields decoded for the scale estimate are kept for their segmentation, up to this many pixels in all.
KEEP_DECODED_PIXELS = 64_000_000


class Decoded:
    """Fields already decoded (for the scale estimate), handed once to read_field: each is decoded only once."""

    def __init__(self) -> None:
        self._fields: dict[str, np.ndarray] = {}
        self._pixels = 0
        self._lock = threading.Lock()

    def keep(self, uri: str, rgb: np.ndarray) -> None:
        with self._lock:
            if self._pixels + rgb.shape[0] * rgb.shape[1] <= KEEP_DECODED_PIXELS:
                self._fields[uri] = rgb
                self._pixels += rgb.shape[0] * rgb.shape[1]

    def take(self, uri: str) -> np.ndarray | None:
        with self._lock:
            return self._fields.pop(uri, None)


def field_scale(uri: str, fetch: Fetch, *, max_pixels: int, decoded: Decoded | None = None) -> float | None:
    """One field's um per pixel from its red cells, or None (unreadable, or too few red cells to measure)."""
    data = _fetch(uri, fetch)
    if isinstance(data, str):
        return None
    try:
        rgb = decode_field(data, source=uri, max_pixels=max_pixels)
    except DecodeError:
        return None
    if decoded is not None:
        decoded.keep(uri, rgb)
    try:
        return estimate_um_per_px(rgb)
    except SegmentationError:
        return None


def sample_scale(
    uris: Sequence[str], fetch: Fetch, pool: Executor, *, max_pixels: int, decoded: Decoded | None = None
) -> float | None:
    """The slide's um per pixel: the median of the estimates of its first SCALE_FIELDS fields (None if none).

    One field's estimate moves with the few red cells it holds (BCCD fields of one microscope: 0.042-0.083);
    the median over several is what every field of the slide is then segmented at. With `decoded`, the fields
    read here are kept for their segmentation.
    """
    measured = pool.map(lambda u: field_scale(u, fetch, max_pixels=max_pixels, decoded=decoded), uris[:SCALE_FIELDS])
    scales = [s for s in measured if s]
    return float(np.median(scales)) if scales else None


def read_field(
    uri: str,
    fetch: Fetch,
    *,
    size: int,
    train_um_per_px: float,
    um_per_px: float | None,
    max_pixels: int,
    scale_source: str | None = None,
    decoded: Decoded | None = None,
) -> Unit:
    """A microscope field as one item per white cell found (see the module docstring).

    `scale_source` names where a given `um_per_px` came from (default: "given", by the submitter).
    """
    rgb = decoded.take(uri) if decoded is not None else None
    try:
        if rgb is None:
            data = _fetch(uri, fetch)
            if isinstance(data, str):
                return Unit(uri, [Item(uri, error=data)], error=data)
            rgb = decode_field(data, source=uri, max_pixels=max_pixels)
        found = segment_field(rgb, um_per_px=um_per_px)
    except DecodeError as exc:
        return Unit(uri, [Item(uri, error=exc.reason)], error=exc.reason)
    except SegmentationError as exc:
        return Unit(uri, [Item(uri, error=str(exc))], error=str(exc))
    source = scale_source if (scale_source and um_per_px is not None) else found.scale_source
    unit = Unit(uri, um_per_px=found.um_per_px, scale_source=source)
    for cell in found.cells:
        info = FieldCell(
            field_uri=uri,
            cell_index=cell.index,
            bbox=cell.bbox,
            centroid=cell.centroid,
            area_um2=cell.area_um2,
            cell_kind=cell.kind,
            edge=cell.edge,
            um_per_px=found.um_per_px,
            scale_source=source,
            outline=outline_json(cell),
        )
        item = Item(f"{uri}#cell={cell.index}", field=info)
        if info.scored:
            # The model's input as the cell's C-NMC crop (at train_um_per_px) would give it, resampled the same way.
            item.image = cut_for_model(
                rgb, cell, field_um_per_px=found.um_per_px, train_um_per_px=train_um_per_px, size=size
            )
        unit.items.append(item)
    return unit

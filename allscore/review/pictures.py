"""The images the review pages show, made on the server: the p(ALL) histogram's SVG geometry, a cell's thumbnail
(from its own image, or cut from its field, with the last fields decoded kept), a field with its cells outlined, and a
model version's report pictures (found in whichever model store holds the version). The routes that serve them are
allscore.review.app's.
"""

from __future__ import annotations

import io
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from core.settings import Settings

THUMB = 96
HIST_BINS = 20


def histogram_svg(probabilities: list[float], threshold: float | None) -> dict[str, Any]:
    """Bars of a p(ALL) histogram (20 bins on [0, 1]) and the threshold's position, for an inline SVG."""
    counts = [0] * HIST_BINS
    for p in probabilities:
        counts[min(HIST_BINS - 1, int(p * HIST_BINS))] += 1
    width, height, left, bottom = 520, 180, 36, 24
    plot_w, plot_h = width - left - 10, height - bottom - 10
    top = max(counts) if any(counts) else 1
    bars = []
    for i, n in enumerate(counts):
        h = plot_h * n / top
        x = left + plot_w * i / HIST_BINS
        over = threshold is not None and (i + 0.5) / HIST_BINS >= threshold
        bars.append({"x": x, "y": 10 + plot_h - h, "w": plot_w / HIST_BINS - 1, "h": h, "n": n, "all": over})
    line = None if threshold is None else left + plot_w * threshold
    ticks = [{"x": left + plot_w * t / 5, "label": f"{t / 5:.1f}"} for t in range(6)]
    return {
        "width": width,
        "height": height,
        "left": left,
        "plot_h": plot_h,
        "bottom_y": 10 + plot_h,
        "bars": bars,
        "line": line,
        "threshold": threshold,
        "top": top,
        "ticks": ticks,
        "n": len(probabilities),
    }


# A field sample's gallery asks for many cells of the same few fields: the last fields decoded are kept.
_FIELDS_KEPT = 8
_fields: OrderedDict[str, Any] = OrderedDict()
_fields_lock = threading.Lock()


def _field_rgb(settings: Settings, uri: str) -> Any:
    from core.imaging import decode_field
    from core.storage import Fetcher

    with _fields_lock:
        if uri in _fields:
            _fields.move_to_end(uri)
            return _fields[uri]
    rgb = decode_field(Fetcher(settings)(uri), source=uri)
    with _fields_lock:
        _fields[uri] = rgb
        while len(_fields) > _FIELDS_KEPT:
            _fields.popitem(last=False)
    return rgb


def thumbnail_png(settings: Settings, cell: dict[str, Any]) -> bytes:
    from PIL import Image

    from core.imaging import decode_image
    from core.storage import Fetcher

    fetch = Fetcher(settings)
    if cell.get("field_uri"):
        rgb = _field_rgb(settings, cell["field_uri"])
        x0, y0, x1, y1 = cell["bbox_x0"], cell["bbox_y0"], cell["bbox_x1"], cell["bbox_y1"]
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
        image = Image.fromarray(rgb).crop(box).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    else:
        image = Image.fromarray(decode_image(fetch(cell["image_uri"]), THUMB, source=cell["image_uri"]))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def overlay_png(
    settings: Settings, sample: dict[str, Any], cells: list[dict[str, Any]], fields: list[dict[str, Any]]
) -> bytes | None:
    from worker.report import render_overlays

    with tempfile.TemporaryDirectory(prefix="allscore-review-") as tmp:
        paths = render_overlays(sample, cells, Path(tmp), settings, fields=fields)
        return paths[0].read_bytes() if paths else None


def find_manifest(settings: Settings, name: str, version: str) -> tuple[Any, Any] | None:
    from core.artifact import Registry
    from core.manifest import ModelError

    for root in settings.stores().values():
        try:
            registry = Registry(root, settings)
            return registry, registry.resolve(f"{name}:{version}")
        except ModelError:
            continue
    return None


def picture_title(file: str) -> str:
    return {
        "roc.png": "ROC curve (validation subjects) with the chosen threshold",
        "confusion.png": "Confusion matrix at the threshold",
        "learning_curves.png": "Learning curves",
        "per_subject.png": "Accuracy per validation subject",
    }.get(file, file)


def picture_bytes(settings: Settings, name: str, version: str, file: str) -> bytes | None:
    from core.storage import join_uri

    found = find_manifest(settings, name, version)
    if found is None or file not in found[1].report_pictures:
        return None
    registry = found[0]
    data: bytes = registry.store.read_bytes(join_uri(registry.version_uri(name, version), file))
    return data

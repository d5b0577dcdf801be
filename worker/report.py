"""Reading results back: rows for the report, and one montage PNG per sample for a reviewer."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core.imaging import DecodeError, decode_field, decode_image
from core.settings import Settings, get_settings
from core.storage import Fetcher, StorageError

THUMB = 96
LABEL_H = 16
FRAME = 4
COLORS = {"all": (220, 40, 40), "hem": (40, 160, 70), "error": (128, 128, 128)}


def _plain(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "value"):
        return value.value
    return value


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV with the view's column names."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _plain(v) for k, v in row.items()})
    return buf.getvalue()


def to_json(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a JSON list."""
    return json.dumps([{k: _plain(v) for k, v in row.items()} for row in rows], indent=2)


class _Fields:
    """Fields read once each for a report (a sample's cells share them)."""

    def __init__(self, fetch: Fetcher) -> None:
        self.fetch = fetch
        self._last: tuple[str, np.ndarray | None] | None = None

    def get(self, uri: str) -> np.ndarray | None:
        if self._last is None or self._last[0] != uri:
            try:
                self._last = (uri, decode_field(self.fetch(uri), source=uri))
            except (StorageError, DecodeError):
                self._last = (uri, None)
        return self._last[1]


def _thumbnail(cell: dict[str, Any], fetch: Fetcher, fields: _Fields) -> np.ndarray | None:
    uri = cell["image_uri"]
    if cell.get("field_uri"):
        rgb = fields.get(cell["field_uri"])
        if rgb is None:
            return None
        x0, y0, x1, y1 = cell["bbox_x0"], cell["bbox_y0"], cell["bbox_x1"], cell["bbox_y1"]
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        box = (cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side)
        crop = Image.fromarray(rgb).crop(box)  # outside the field reads as black
        return np.asarray(crop.resize((THUMB, THUMB), Image.Resampling.BILINEAR))
    try:
        return decode_image(fetch(uri), THUMB, source=uri)
    except (StorageError, DecodeError):
        return None


def render_montage(
    sample: dict[str, Any], cells: Sequence[dict[str, Any]], out_dir: Path, settings: Settings | None = None
) -> Path:
    """One PNG: the sample's cells sorted by p(ALL), framed by their call, with the probability under each."""
    settings = settings or get_settings()
    fetch = Fetcher(settings)  # one S3 client per bucket for the whole montage, not one per cell
    fields = _Fields(fetch)
    # The cells that count: every image of a cell sample; a field sample's whole lymphoid cells and bad fields.
    counted = [c for c in cells if not c.get("field_uri") or (c["cell_kind"] == "lymphoid" and not c["edge"])]
    ordered = sorted(counted, key=lambda c: (c["p_all"] is None, -(c["p_all"] or 0.0)))
    n = max(1, len(ordered))
    cols = min(12, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    tile_w, tile_h = THUMB + 2 * FRAME, THUMB + 2 * FRAME + LABEL_H
    header = 40
    # Pillow's bundled font; at its default 10 px the spaces nearly vanish ("not scored" read as one word).
    font = ImageFont.load_default(size=12)
    fraction = sample.get("all_fraction")
    title = f"{sample['sample_id']}  {sample.get('model_version', '')}"
    if fraction is not None:
        title += (
            f"   ALL {fraction:.1%} (95% CI {sample['ci_low']:.1%}-{sample['ci_high']:.1%}), "
            f"{sample['n_all']}/{sample['n_cells'] - sample['n_failed']} cells"
        )
    legend = "red frame = called ALL, green = normal (hem), grey = not scored"
    # As wide as the grid, or as the header's lines when a small sample makes the grid narrower.
    width = max(cols * tile_w, math.ceil(max(font.getlength(title), font.getlength(legend))) + 8)
    canvas = Image.new("RGB", (width, header + rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    draw.text((4, 21), legend, fill=(90, 90, 90), font=font)
    for i, cell in enumerate(ordered):
        x, y = (i % cols) * tile_w, header + (i // cols) * tile_h
        kind = "error" if cell["p_all"] is None else ("all" if cell["is_all"] else "hem")
        draw.rectangle((x, y, x + tile_w - 1, y + THUMB + 2 * FRAME - 1), fill=COLORS[kind])
        thumb = _thumbnail(cell, fetch, fields) if cell["p_all"] is not None else None
        if thumb is not None:
            canvas.paste(Image.fromarray(thumb), (x + FRAME, y + FRAME))
        else:
            draw.rectangle((x + FRAME, y + FRAME, x + FRAME + THUMB - 1, y + FRAME + THUMB - 1), fill=(0, 0, 0))
        label = "error" if cell["p_all"] is None else f"p={cell['p_all']:.2f}"
        draw.text((x + FRAME, y + THUMB + 2 * FRAME + 2), label, fill=(0, 0, 0), font=font)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(sample["sample_id"]))
    version = str(sample.get("model_version", "")).replace(":", "_")
    path = out_dir / f"{safe}__{version}.png"
    canvas.save(path)
    return path


# Overlay colours: the call for scored cells, and what was found but not scored.
OVERLAY = {
    "all": (230, 30, 30),
    "hem": (20, 170, 60),
    "other": (40, 90, 230),
    "edge": (240, 170, 0),
    "error": (128, 128, 128),
}


def _cell_state(cell: dict[str, Any]) -> str:
    if cell["cell_kind"] != "lymphoid":
        return "other"
    if cell["edge"]:
        return "edge"
    if cell["p_all"] is None:
        return "error"
    return "all" if cell["is_all"] else "hem"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def render_overlays(
    sample: dict[str, Any],
    cells: Sequence[dict[str, Any]],
    out_dir: Path,
    settings: Settings | None = None,
    fields: Sequence[dict[str, Any]] | None = None,
) -> list[Path]:
    """One PNG per field of a field sample: every cell found outlined, coloured by its call and kind, with
    p(ALL) beside each scored cell, so a reviewer sees at once what was found, what was scored and what not.

    `fields` (rows of the view field_results) names every field read, in the order submitted, those where no
    white cell was found too; without it (results from before migration 0010) the fields are those of the cells.
    """
    settings = settings or get_settings()
    fetch = Fetcher(settings)
    by_field: dict[str, list[dict[str, Any]]] = {}
    for cell in cells:
        if cell.get("field_uri"):
            by_field.setdefault(cell["field_uri"], []).append(cell)
    scales: dict[str, tuple[float | None, str | None]] = {}
    if fields:
        order = [f["field_uri"] for f in sorted(fields, key=lambda f: f["field_index"]) if not f.get("error")]
        scales = {f["field_uri"]: (f["um_per_px"], f["scale_source"]) for f in fields}
    else:
        order = sorted(by_field)
    for uri, found in by_field.items():
        scales.setdefault(uri, (found[0]["um_per_px"], found[0]["scale_source"]))
    folder = out_dir / f"{_safe(str(sample['sample_id']))}__{_safe(str(sample.get('model_version', '')))}"
    folder.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    paths = []
    for number, uri in enumerate(order, start=1):
        found = by_field.get(uri, [])
        try:
            rgb = decode_field(fetch(uri), source=uri)
        except (StorageError, DecodeError):
            continue
        height, width = rgb.shape[:2]
        scale = max(1.0, max(width, height) / 1000)
        header = int(64 * scale)
        # at least as wide as the header's lines, so a narrow field's legend is not cut off
        canvas = Image.new("RGB", (max(width, int(640 * scale)), height + header), (255, 255, 255))
        canvas.paste(Image.fromarray(rgb), (0, header))
        draw = ImageDraw.Draw(canvas)
        counts: dict[str, int] = {}
        for cell in found:
            state = _cell_state(cell)
            counts[state] = counts.get(state, 0) + 1
            points = [(x, y + header) for x, y in json.loads(cell["outline"] or "[]")]
            colour = OVERLAY[state]
            if len(points) >= 3:
                draw.line([*points, points[0]], fill=colour, width=max(2, round(2 * scale)))
            label = {"other": "other", "edge": "edge", "error": "error"}.get(state) or f"{cell['p_all']:.2f}"
            draw.text(
                (cell["bbox_x1"] + 3, cell["bbox_y0"] + header),
                label,
                fill=colour,
                font=font,
                stroke_width=2,
                stroke_fill=(255, 255, 255),
            )
        name = uri.rsplit("/", 1)[-1]
        title = f"{sample['sample_id']}  {name}  {sample.get('model_version', '')}"
        um, source = scales.get(uri, (None, None))
        tally = (
            f"ALL {counts.get('all', 0)}  normal {counts.get('hem', 0)}  other {counts.get('other', 0)}  "
            f"edge {counts.get('edge', 0)}"
            if found
            else "no white cell found in this field"
        ) + (f"   {um:.3f} um/px ({source})" if um is not None else "")
        legend = "red = called ALL (p beside), green = normal, blue = other kind, amber = cut by the edge"
        draw.text((4, 3), title, fill=(0, 0, 0), font=font)
        draw.text((4, 3 + int(20 * scale)), tally, fill=(0, 0, 0), font=font)
        draw.text((4, 3 + int(40 * scale)), legend, fill=(90, 90, 90), font=small)
        path = folder / f"{number:03d}_{_safe(name.rsplit('.', 1)[0] if '.' in name else name)}.png"
        canvas.save(path)
        paths.append(path)
    return paths


# The review columns `allscore report --reviews` adds (the view sample_reviews, migration 0006).
REVIEW_COLUMNS = ("n_reviewed", "n_disagree", "reviewed_fraction", "signed_off_by", "signed_off_at", "sign_off_comment")


def add_reviews(rows: Sequence[dict[str, Any]], session: Any) -> list[dict[str, Any]]:
    """The rows with the reviewers' figures (sample_reviews) appended: verdicts, reviewed fraction, sign-off."""
    from db.reviews import get_sample_reviews

    found = {
        (r["sample_id"], r["model_version"]): r
        for r in get_sample_reviews(session=session, sample_ids=sorted({row["sample_id"] for row in rows}))
    }
    out = []
    for row in rows:
        review = found.get((row["sample_id"], row["model_version"]), {})
        out.append({**row, **{k: review.get(k) for k in REVIEW_COLUMNS}})
    return out

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

from core.imaging import DecodeError, decode_image
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


def _thumbnail(uri: str, fetch: Fetcher) -> np.ndarray | None:
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
    ordered = sorted(cells, key=lambda c: (c["p_all"] is None, -(c["p_all"] or 0.0)))
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
        thumb = _thumbnail(cell["image_uri"], fetch) if cell["p_all"] is not None else None
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

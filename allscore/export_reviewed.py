"""`allscore data export-reviewed OUT`: the reviewed cells as a data set `allscore train` reads.

Layout (trainer.discovery reads it as a folder holding all/ and hem/; the subject is the slide, so a training split
by subject never puts one slide on both sides):

    OUT/all/UID_<slide>_<field>_<cell>.png     cells the reviewer says are ALL (agreed ALL calls and corrections)
    OUT/hem/UID_<slide>_<field>_<cell>.png     ... normal
    OUT/reviewed.csv                           one row per cell written: where it came from, who said what

Cells corrected to `other` or `not_a_cell` are not training data for the ALL/hem model and are left out (counted).
A single-cell image is written as it is (decoded, saved as PNG); a cell found in a field is cut from its field as
the worker cut it for its model: a C-NMC crop at the C-NMC scale, black outside its outline. The folder's
allscore-data.json records that scale for the trainer.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image, ImageDraw

from core.errors import AllscoreError
from core.imaging import decode_field
from core.settings import Settings, get_settings
from core.storage import Fetcher
from db import reviews
from db.engine import make_engine, session_factory
from trainer.dataset import write_data_scale

TRAINABLE = ("all", "hem")
_SUBJECT_SAFE = re.compile(r"[^A-Za-z0-9-]+")


class ExportError(AllscoreError):
    """An export that cannot be written as asked."""


@dataclass
class ExportSummary:
    written: dict[str, int] = field(default_factory=lambda: {"all": 0, "hem": 0})
    left_out: dict[str, int] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    slides: set[str] = field(default_factory=set)

    def describe(self) -> str:
        out = (
            f"{self.written['all']} ALL and {self.written['hem']} normal cells from {len(self.slides)} slides"
            + "".join(f", {n} {cls} left out" for cls, n in sorted(self.left_out.items()))
        )
        if self.unreadable:
            out += f", {len(self.unreadable)} unreadable (e.g. {self.unreadable[0]})"
        return out


def subject_of(sample_id: str) -> str:
    """The sample id as a C-NMC subject (letters, digits, '-'); ids that had to change get a short hash."""
    safe = _SUBJECT_SAFE.sub("-", sample_id).strip("-") or "slide"
    if safe != sample_id:
        safe += "-" + hashlib.sha256(sample_id.encode()).hexdigest()[:8]
    return safe


def _field_crop(
    rgb: np.ndarray, cell: reviews.ReviewedCell, outline: list[list[float]], um_per_px: float | None
) -> Image.Image:
    """The cell as the worker cut it for its model: the C-NMC crop (450x450, black outside its outline, centred) at
    the C-NMC scale, from the field at the scale the worker used (its row's um_per_px)."""
    assert cell.bbox is not None
    x0, y0, x1, y1 = cell.bbox
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    if len(outline) >= 3:
        ImageDraw.Draw(mask).polygon([(float(x) - x0, float(y) - y0) for x, y in outline], fill=255)
    else:
        ImageDraw.Draw(mask).rectangle((0, 0, x1 - x0 - 1, y1 - y0 - 1), fill=255)
    inside = np.asarray(mask) > 0
    if not inside.any():
        inside[:] = True
    ys, xs = np.nonzero(inside)
    from core.cut import cut_cell
    from core.segment import CNMC_UM_PER_PX, FoundCell  # scipy, scikit-image, OpenCV: only here

    found = FoundCell(
        index=0,
        bbox=(x0, y0, x1, y1),
        centroid=(float(xs.mean()) + x0, float(ys.mean()) + y0),
        area_um2=0.0,
        kind="lymphoid",
        edge=False,
        mask=inside,
    )
    scale = um_per_px or CNMC_UM_PER_PX
    return Image.fromarray(cut_cell(rgb, found, field_um_per_px=scale, target_um_per_px=CNMC_UM_PER_PX))


def export_reviewed(
    out: Path, *, since: datetime | None = None, settings: Settings | None = None, database_url: str | None = None
) -> ExportSummary:
    """Write every reviewed cell (reviewed at or after `since`) with the reviewer's class into `out`."""
    settings = settings or get_settings()
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new folder")
    engine = make_engine(database_url, settings)
    try:
        with session_factory(engine)() as session:
            found = reviews.reviewed_cells(session=session, since=since)
            outlines = _outlines(session, [c for c in found if c.field_uri])
    finally:
        engine.dispose()
    summary = ExportSummary()
    fetch = Fetcher(settings)
    fields: dict[str, np.ndarray | None] = {}
    numbers: dict[tuple[str, str], int] = {}
    counters: dict[tuple[str, str], int] = {}
    rows = []
    for cls in TRAINABLE:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for cell in found:
        if cell.final_class not in TRAINABLE:
            summary.left_out[cell.final_class] = summary.left_out.get(cell.final_class, 0) + 1
            continue
        subject = subject_of(cell.sample_id)
        source = cell.field_uri or ""
        field_no = numbers.setdefault((cell.sample_id, source), len([k for k in numbers if k[0] == cell.sample_id]))
        cell_no = counters.get((cell.sample_id, source), 0)
        try:
            if cell.field_uri is not None:
                if cell.field_uri not in fields:
                    fields[cell.field_uri] = decode_field(fetch(cell.field_uri), source=cell.field_uri)
                rgb = fields[cell.field_uri]
                assert rgb is not None
                outline, scale = outlines.get((cell.sample_id, cell.model_version, cell.image_uri), ([], None))
                image = _field_crop(rgb, cell, outline, scale)
            else:
                image = Image.open(io.BytesIO(fetch(cell.image_uri))).convert("RGB")
        except (AllscoreError, OSError) as exc:
            summary.unreadable.append(f"{cell.image_uri}: {exc}")
            continue
        name = f"UID_{subject}_{field_no}_{cell_no}.png"
        image.save(out / cell.final_class / name)
        counters[(cell.sample_id, source)] = cell_no + 1
        summary.written[cell.final_class] += 1
        summary.slides.add(cell.sample_id)
        rows.append(
            {
                "file": f"{cell.final_class}/{name}",
                "sample_id": cell.sample_id,
                "source": source,
                "image_uri": cell.image_uri,
                "model_version": cell.model_version,
                "class": cell.final_class,
                "reviewer": cell.reviewer,
                "reviewed_at": cell.reviewed_at.isoformat(),
            }
        )
    with (out / "reviewed.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh,
            fieldnames=[
                "file",
                "sample_id",
                "source",
                "image_uri",
                "model_version",
                "class",
                "reviewer",
                "reviewed_at",
            ],
        )
        writer.writeheader()
        writer.writerows(rows)
    from core.segment import CNMC_UM_PER_PX

    write_data_scale(out, CNMC_UM_PER_PX, "allscore data export-reviewed (field cells cut at the C-NMC scale)")
    return summary


def _outlines(
    session: object, cells: list[reviews.ReviewedCell]
) -> dict[tuple[str, str, str], tuple[list[list[float]], float | None]]:
    """The outlines of the field cells and the scales their fields were segmented at, from cell_results."""
    if not cells:
        return {}
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.views import cell_results

    assert isinstance(session, Session)
    wanted = {(c.sample_id, c.model_version, c.image_uri) for c in cells}
    stmt = select(
        cell_results.c.sample_id,
        cell_results.c.model_version,
        cell_results.c.image_uri,
        cell_results.c.outline,
        cell_results.c.um_per_px,
    ).where(cell_results.c.sample_id.in_({c.sample_id for c in cells}), cell_results.c.field_uri.is_not(None))
    out = {}
    for row in session.execute(stmt):
        key = (row.sample_id, row.model_version, row.image_uri)
        if key in wanted:
            out[key] = (json.loads(row.outline or "[]"), row.um_per_px)
    return out


def export_reviewed_cmd(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="a new folder for the data set")],
    since: Annotated[
        datetime | None,
        typer.Option(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"], help="only cells reviewed at or after (UTC)"),
    ] = None,
) -> None:
    """Write the reviewed cells, with the reviewer's class and the slide as the subject, for `allscore train`."""
    from core.console import stderr_console

    summary = export_reviewed(out, since=since.replace(tzinfo=UTC) if since is not None else None)
    stderr_console().print(f"wrote {summary.describe()} to {out}")
    if not sum(summary.written.values()):
        raise ExportError("no reviewed ALL or normal cells to export" + (f" since {since:%Y-%m-%d}" if since else ""))
    typer.echo(str(out))

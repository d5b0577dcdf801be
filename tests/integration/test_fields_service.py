"""Microscope fields through the real service: Redis, PostgreSQL and a prefork worker score real BCCD fields.

The fields are real smears (BCCD, MIT licence, tests/data/bccd). The tiny model was trained on synthetic cells, so
its calls on these cells mean nothing and nothing here reads them; what is checked is what the lab and a reviewer
check: a row per cell found, where it is and what kind it is, the per-sample counts, an error row for each field
that cannot be read while the rest is scored, and one overlay picture per field.
"""

from __future__ import annotations

import csv
import io
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner

from core.settings import reset_settings_cache
from db.engine import make_engine
from tests.fixtures import PublishedModel
from tests.worker_process import WorkerProcess
from worker.cli import wait_for_job
from worker.client import submit_sample

pytestmark = pytest.mark.integration

BCCD = Path(__file__).resolve().parents[1] / "data" / "bccd"


@pytest.fixture
def fields_service(
    tmp_path: Path, pg_url: str, redis_url: str, tiny_model: PublishedModel, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """A worker on the local services with the tiny model in a local store; the test submits as a lab would."""
    env = {
        "ALLSCORE_HOME": str(tmp_path / "home"),
        "ALLSCORE_DATABASE_URL": pg_url,
        "ALLSCORE_BROKER_URL": redis_url,
        "ALLSCORE_QUEUE": f"allscore-fields-{uuid.uuid4().hex[:8]}",
        "ALLSCORE_MODEL_STORE": tiny_model.store,
        "ALLSCORE_BATCH_SIZE": "16",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=1).start()
    try:
        yield env
    finally:
        worker.stop()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (the pixel data never comes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _boxes() -> dict[str, list[tuple[int, int, int, int]]]:
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    with (BCCD / "wbc.csv").open() as fh:
        for row in csv.DictReader(fh):
            box = (int(row["xmin"]), int(row["ymin"]), int(row["xmax"]), int(row["ymax"]))
            boxes.setdefault(row["file"], []).append(box)
    return boxes


@pytest.mark.timeout(300)
def test_a_worker_scores_real_bccd_fields_with_a_row_per_cell_and_an_overlay_per_field(
    fields_service: dict[str, str], tiny_model: PublishedModel, tmp_path: Path
) -> None:
    folder = tmp_path / "slide-bccd"
    folder.mkdir()
    fields = sorted((BCCD / "JPEGImages").glob("*.jpg"))
    for path in fields:
        (folder / path.name).write_bytes(path.read_bytes())
    bad = {
        "not-an-image.jpg": (b"%PDF-1.4 this is a report, not a field", "not a recognised image"),
        "all-black.png": (_png((0, 0, 0), (640, 480)), "blank"),
        "all-white.png": (_png((255, 255, 255), (640, 480)), "blank"),
        "one-pixel.png": (_png((200, 120, 160), (1, 1)), "smaller than"),
        "huge.png": (_png_declaring(20000, 20000), "declared size"),
        "cut-in-half.jpg": (fields[0].read_bytes()[: len(fields[0].read_bytes()) // 2], "truncated"),
    }
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    # A real field with no white cell in it (red cells only): the part of a BCCD field away from its boxed white
    # cell. It is not an error: a field row with nothing found, and an overlay a reviewer can look at.
    empty = "no-white-cell.jpg"
    (x0, y0, x1, y1), *more = _boxes()[fields[0].name]
    assert not more and x0 >= 256, "the first BCCD field holds one white cell, right of x=256"
    with Image.open(fields[0]) as im:
        im.crop((0, 0, 256, 480)).save(folder / empty, quality=95)

    job = submit_sample("slide-bccd", [str(folder)], model_ref=tiny_model.ref, kind="fields")
    (row,) = wait_for_job(job, 1, timeout=240)
    assert row["status"] == "done", row
    assert (row["kind"], row["n_fields"], row["n_fields_failed"]) == ("fields", len(fields) + len(bad) + 1, len(bad))
    assert row["scale_source"] == "estimated" and 0.05 < row["um_per_px"] < 0.2, row

    engine = make_engine(fields_service["ALLSCORE_DATABASE_URL"])
    with engine.connect() as conn:
        cells = [
            dict(r._mapping) for r in conn.execute(text("SELECT * FROM cell_results WHERE sample_id = 'slide-bccd'"))
        ]
        field_rows = {
            Path(r.field_uri).name: dict(r._mapping)
            for r in conn.execute(text("SELECT * FROM field_results WHERE sample_id = 'slide-bccd'"))
        }
    engine.dispose()
    errors = {Path(c["image_uri"]).name: c["error"] for c in cells if c["field_uri"] is None}
    assert set(errors) == set(bad), errors
    for name, (_, reason) in bad.items():
        assert reason in str(errors[name]), (name, errors[name])

    found = [c for c in cells if c["field_uri"] is not None]
    for cell in found:
        assert cell["image_uri"] == f"{cell['field_uri']}#cell={cell['cell_index']}"
        assert 0 <= cell["bbox_x0"] < cell["bbox_x1"] <= 640 and 0 <= cell["bbox_y0"] < cell["bbox_y1"] <= 480
        assert cell["bbox_x0"] <= cell["centroid_x"] <= cell["bbox_x1"]
        # a cell holds at least its nucleus: 10 um2 or more (smaller stained specks are platelets or debris)
        assert cell["cell_kind"] in ("lymphoid", "other") and cell["area_um2"] > 10
        scored = cell["cell_kind"] == "lymphoid" and not cell["edge"]
        assert (cell["p_all"] is not None) == scored, cell
    # Every hand-boxed white cell of these fields lies under a cell found (recall itself, centroid in box, is
    # measured on all 182 BCCD fields by bench/eval_fields.py and in tests/unit/test_segment.py).
    for name, boxes in _boxes().items():
        here = [c for c in found if Path(c["field_uri"]).name == name]
        for x0, y0, x1, y1 in boxes:
            assert any(
                c["bbox_x0"] < x1 and x0 < c["bbox_x1"] and c["bbox_y0"] < y1 and y0 < c["bbox_y1"] for c in here
            ), (name, (x0, y0, x1, y1))
    # The counts say the same as the rows: n_cells are the whole lymphoid cells plus the unreadable fields.
    whole_lymphoid = [c for c in found if c["cell_kind"] == "lymphoid" and not c["edge"]]
    assert row["n_cells"] == len(whole_lymphoid) + len(bad)
    assert row["n_failed"] == len(bad) + sum(1 for c in whole_lymphoid if c["p_all"] is None)
    assert row["n_other"] == sum(1 for c in found if c["cell_kind"] == "other")
    assert row["n_edge"] == sum(1 for c in found if c["cell_kind"] == "lymphoid" and c["edge"])
    # One field row per field submitted: what was found in it (all kinds, edge or not), or why it was not read.
    assert set(field_rows) == {p.name for p in fields} | set(bad) | {empty}
    for name, fld in field_rows.items():
        here = [c for c in found if Path(c["field_uri"]).name == name]
        assert fld["n_found"] == len(here), name
        assert fld["n_scored"] == sum(1 for c in here if c["cell_kind"] == "lymphoid" and not c["edge"]), name
        assert fld["n_other"] == sum(1 for c in here if c["cell_kind"] == "other"), name
        assert (fld["error"] is not None) == (name in bad), name
        assert (fld["um_per_px"] is None) == (name in bad), name
    assert field_rows[empty]["n_found"] == 0 and field_rows[empty]["error"] is None
    assert sorted(f["field_index"] for f in field_rows.values()) == list(range(len(field_rows)))
    # BCCD is normal blood, mostly neutrophils: most cells found are not lymphoid, and none is scored as one.
    assert row["n_other"] >= len(fields) // 2
    assert "low_count" in row["flags"]

    from allscore.cli import app

    overlays = tmp_path / "overlays"
    result = CliRunner().invoke(app, ["report", "slide-bccd", "--overlays", str(overlays)])
    assert result.exit_code == 0, result.output
    pictures = sorted(overlays.rglob("*.png"))
    # one picture per field read, the one where nothing was found too; none for the fields that could not be read
    assert len(pictures) == len(fields) + 1
    for picture in pictures:
        with Image.open(picture) as im:
            if empty.removesuffix(".jpg") in picture.name:
                assert im.size[0] == 640 and im.size[1] > 480  # the narrow field on a canvas as wide as the header
            else:
                assert im.size[0] == 640 and im.size[1] > 480  # the field, under a header

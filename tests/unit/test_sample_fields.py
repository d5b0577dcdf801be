"""The fields of a field sample (migration 0010): every field read is a row of field_results, the one where no white
cell was found too, so its overlay can be drawn and a reviewer can open it. The engine runs on SQLite with a
stand-in model (its calls are not what is checked) on real BCCD fields (tests/data/bccd, MIT licence)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from allscore.review.app import create_app
from allscore.review.auth import hash_password
from core.artifact import LoadedModel
from core.contract import ScoreMessage
from core.storage import LocalStore
from db import repository, reviews
from db.engine import make_engine, session_factory, transaction
from db.migrate import upgrade
from tests.harness.artifacts import brightness_model, stand_in_manifest
from tests.helpers import BCCD_FIELDS
from worker.engine import score_sample
from worker.report import render_overlays

SIZE = 16


@pytest.fixture
def scored(tmp_path: Path) -> tuple[str, dict[str, Path]]:
    """A field sample of two real BCCD fields, a field with no white cell and a file that is not an image, scored
    by the engine into a SQLite database; returns the database URL and the fields by name."""
    folder = tmp_path / "slide"
    folder.mkdir()
    files = {
        "a.jpg": BCCD_FIELDS / "BloodImage_00000.jpg",
        "b.jpg": BCCD_FIELDS / "BloodImage_00004.jpg",
    }
    for name, source in files.items():
        (folder / name).write_bytes(source.read_bytes())
    # BloodImage_00000's one white cell lies right of x=260 (wbc.csv): its left part holds red cells only
    with Image.open(BCCD_FIELDS / "BloodImage_00000.jpg") as im:
        im.crop((0, 0, 256, 480)).save(folder / "empty.jpg", quality=95)
    (folder / "report.jpg").write_bytes(b"%PDF-1.4 a report, not a field")
    paths = {name: folder / name for name in ("a.jpg", "empty.jpg", "b.jpg", "report.jpg")}

    url = f"sqlite:///{tmp_path / 'scores.db'}"
    upgrade(url)
    factory = session_factory(make_engine(url))
    with transaction(factory) as session:
        repository.create_job(session=session, job_id="job1", n_samples=1)
        repository.enqueue_sample(session=session, job_id="job1", sample_id="S1", model_version="fake:1", kind="fields")
        reviews.add_user(session=session, name="ann", password_hash=hash_password("ann-password"), can_write=True)
    message = ScoreMessage(
        job_id="job1",
        sample_id="S1",
        image_uris=tuple(str(p) for p in paths.values()),
        model_version="fake:1",
        submission=1,
        kind="fields",
        um_per_px=0.1,
    )
    with ThreadPoolExecutor(2) as pool:
        score_sample(
            message,
            loaded=LoadedModel(model=brightness_model, manifest=stand_in_manifest(SIZE), path=tmp_path),
            fetch=LocalStore().read_bytes,
            sessions=factory,
            pool=pool,
            batch_size=8,
        )
    return url, paths


def _read(url: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The sample's row, its cell rows and its field rows, as an analyst reads them."""
    with session_factory(make_engine(url))() as session:
        (sample,) = repository.get_sample_results(session=session, sample_ids=["S1"])
        cells = repository.get_cell_results(session=session, sample_id="S1")
        fields = repository.get_field_results(session=session, sample_id="S1")
    return sample, cells, fields


def test_every_field_read_is_a_row_with_what_was_found_in_it(scored: tuple[str, dict[str, Path]]) -> None:
    url, paths = scored
    sample, cells, fields = _read(url)
    assert [Path(f["field_uri"]).name for f in fields] == list(paths)  # in the order submitted
    assert [f["field_index"] for f in fields] == [0, 1, 2, 3]
    by_name = {Path(f["field_uri"]).name: f for f in fields}
    for name in ("a.jpg", "b.jpg", "empty.jpg"):
        here = [c for c in cells if c["field_uri"] == str(paths[name])]
        row = by_name[name]
        assert row["error"] is None and (row["um_per_px"], row["scale_source"]) == (0.1, "given")
        assert row["n_found"] == len(here)
        assert row["n_scored"] == sum(1 for c in here if c["p_all"] is not None)
        assert row["n_other"] == sum(1 for c in here if c["cell_kind"] == "other")
        assert row["n_edge"] == sum(1 for c in here if c["cell_kind"] == "lymphoid" and c["edge"])
    assert by_name["a.jpg"]["n_found"] >= 1 and by_name["b.jpg"]["n_found"] >= 1
    assert by_name["empty.jpg"]["n_found"] == 0
    assert "not a recognised image" in by_name["report.jpg"]["error"] and by_name["report.jpg"]["n_found"] == 0
    assert (sample["n_fields"], sample["n_fields_failed"]) == (4, 1)
    assert sample["n_other"] == sum(f["n_other"] for f in fields)


def test_resubmitting_or_failing_a_sample_clears_its_field_rows(scored: tuple[str, dict[str, Path]]) -> None:
    url, _ = scored
    factory = session_factory(make_engine(url))
    with transaction(factory) as session:
        repository.enqueue_sample(session=session, job_id="job1", sample_id="S1", model_version="fake:1", kind="fields")
    with factory() as session:
        assert repository.get_field_results(session=session, sample_id="S1") == []
        assert repository.get_cell_results(session=session, sample_id="S1") == []


def test_the_field_with_no_cell_has_an_overlay_in_the_report_and_the_review_page(
    scored: tuple[str, dict[str, Path]], tmp_path: Path
) -> None:
    url, paths = scored
    sample, cells, fields = _read(url)
    pictures = render_overlays(sample, cells, tmp_path / "overlays", fields=fields)
    # one per field read, in the order submitted; none for the file that is not an image
    assert [p.name for p in pictures] == ["001_a.png", "002_empty.png", "003_b.png"]
    with Image.open(pictures[1]) as im:
        header = np.asarray(im.convert("L"))[:60]
        assert (header < 128).any()  # the header's text is drawn
        field = np.asarray(im.convert("RGB"))[-480:, :256]
    with Image.open(paths["empty.jpg"]) as src:
        # the field itself, unmarked: no cell outline is drawn on it (JPEG re-encoding aside)
        assert np.abs(field.astype(int) - np.asarray(src.convert("RGB")).astype(int)).mean() < 2

    client = TestClient(create_app(database_url=url, secret="s" * 40), follow_redirects=False)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert token
    login = client.post("/login", data={"name": "ann", "password": "ann-password", "csrf_token": token.group(1)})
    assert login.status_code == 303
    page = client.get("/sample", params={"id": "S1", "model": "fake:1"})
    assert page.status_code == 200
    assert "empty.jpg (no white cell found)" in page.text and "report.jpg" not in page.text
    overlay = client.get("/overlay", params={"id": "S1", "model": "fake:1", "field": str(paths["empty.jpg"])})
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    elsewhere = client.get("/overlay", params={"id": "S1", "model": "fake:1", "field": "/etc/hostname"})
    assert elsewhere.status_code == 404

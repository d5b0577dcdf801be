"""`allscore data export-reviewed`: reviewed cells out, in a layout `allscore train` takes back in.

The slides are the synthetic subjects (their true class is in their file names); the "model" calls every third
cell wrongly; the reviewer corrects those to the truth, agrees with the rest, and marks one cell of each slide
`not a cell`. The export must hold exactly the reviewer's classes, and a tiny model trains on it.
"""

from __future__ import annotations

import csv
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from core.contract import CellResult
from db import reviews
from db.engine import make_engine, session_factory, transaction
from db.migrate import upgrade
from tests.harness.cli import run_allscore
from tests.harness.db import score, submit
from tests.helpers import BCCD_FIELDS
from trainer.discovery import discover

pytestmark = pytest.mark.slow

CELLS_PER_SLIDE = 10
MODEL = "cnn:1"


def _reviewed_database(tmp_path: Path, synth_data: Path) -> tuple[str, dict[str, str], int]:
    """A SQLite database with one scored, fully reviewed sample per synthetic subject; returns its URL, the true
    class of every exported image and how many were marked not a cell."""
    url = f"sqlite:///{tmp_path / 'db' / 'allscore.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    truth: dict[str, str] = {}
    excluded = 0
    by_subject = discover(synth_data).by_subject()
    for subject, records in sorted(by_subject.items()):
        chosen = records[:CELLS_PER_SLIDE]
        slide = f"slide {subject}"  # a space: not a C-NMC subject as it stands
        submit(factory, f"job-{subject}", [slide], MODEL)
        cells = []
        for i, record in enumerate(chosen):
            really_all = record.label == 1
            called_all = really_all if i % 3 else not really_all
            cells.append(CellResult(str(record.path), 0.9 if called_all else 0.1, called_all))
        score(factory, slide, MODEL, cells)
        with transaction(factory) as s:
            for i, (record, cell) in enumerate(zip(chosen, cells, strict=True)):
                true_class = "all" if record.label == 1 else "hem"
                if i == 1:
                    corrected: str | None = "not_a_cell"
                    excluded += 1
                else:
                    corrected = None if cell.is_all == (true_class == "all") else true_class
                    truth[cell.image_uri] = true_class
                reviews.record_verdict(
                    session=s,
                    sample_id=slide,
                    model_version=MODEL,
                    image_uri=cell.image_uri,
                    agree=corrected is None,
                    corrected_class=corrected,
                    reviewer="ann",
                )
    engine.dispose()
    return url, truth, excluded


def test_export_holds_the_reviewers_classes_and_trains(tmp_path: Path, synth_data: Path) -> None:
    url, truth, excluded = _reviewed_database(tmp_path, synth_data)
    env = {"ALLSCORE_DATABASE_URL": url, "ALLSCORE_HOME": str(tmp_path / "home")}
    out = tmp_path / "export"
    run = run_allscore("data", "export-reviewed", str(out), env=env, timeout=120)
    assert f"{excluded} not_a_cell left out" in " ".join(run.stderr.split())

    with (out / "reviewed.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["image_uri"]: r["class"] for r in rows} == truth
    for row in rows:
        assert (out / row["file"]).is_file()
        assert row["file"].split("/")[0] == truth[row["image_uri"]]

    # The trainer reads the export: every cell, its class, the slide as its subject.
    dataset = discover(out)
    assert len(dataset.cells) == len(truth)
    assert dataset.class_counts() == {
        "all": sum(v == "all" for v in truth.values()),
        "hem": sum(v == "hem" for v in truth.values()),
    }
    slides = {r["sample_id"] for r in rows}
    assert len(dataset.subjects) == len(slides)
    assert all(s.startswith("slide-") for s in dataset.subjects)

    from trainer.train import TrainConfig, train_model

    config = TrainConfig(name="lab", arch="tiny", image_size=32, epochs=2, patience=2, val_fraction=0.34, version="r1")
    outcome = train_model(out, config, Console(stderr=True, quiet=True))
    m = outcome.manifest
    assert m.n_train_cells + m.n_val_cells == len(truth)
    assert set(m.train_subjects) | set(m.val_subjects) == set(dataset.subjects)
    assert not set(m.train_subjects) & set(m.val_subjects)


def test_export_since_and_into_a_used_folder(tmp_path: Path, synth_data: Path) -> None:
    url, _, _ = _reviewed_database(tmp_path, synth_data)
    env = {"ALLSCORE_DATABASE_URL": url, "ALLSCORE_HOME": str(tmp_path / "home")}
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return run_allscore("data", "export-reviewed", *args, env=env, check=False, timeout=120)

    later = export(str(tmp_path / "later"), "--since", tomorrow)
    # (rich wraps stderr: compare with its line breaks folded)
    assert later.returncode == 3 and "no reviewed ALL or normal cells to export since" in " ".join(later.stderr.split())
    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    refused = export(str(used))
    assert refused.returncode == 3 and "is not empty" in " ".join(refused.stderr.split())


def test_a_field_cell_is_exported_as_the_worker_cut_it_for_its_model(tmp_path: Path) -> None:
    # A reviewed cell found in a real BCCD field: the export holds its C-NMC crop (450x450, black outside, centred)
    # at the C-NMC scale, whatever the field's scale, and says so in allscore-data.json for the trainer.
    import json

    import numpy as np
    from PIL import Image

    from allscore.export_reviewed import export_reviewed
    from core.contract import FieldCell
    from core.segment import CNMC_UM_PER_PX, segment_field
    from worker.fields import outline_json

    field = BCCD_FIELDS / "BloodImage_00200.jpg"
    with Image.open(field) as im:
        rgb = np.asarray(im.convert("RGB"))
    seg = segment_field(rgb, um_per_px=0.1)
    cell = next(c for c in seg.cells if not c.edge)
    info = FieldCell(
        field_uri=str(field),
        cell_index=cell.index,
        bbox=cell.bbox,
        centroid=cell.centroid,
        area_um2=cell.area_um2,
        cell_kind="lymphoid",
        edge=False,
        um_per_px=0.1,
        scale_source="given",
        outline=outline_json(cell),
    )
    url = f"sqlite:///{tmp_path / 'allscore.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    submit(factory, "job-f", ["SLIDE-F"], MODEL)
    uri = f"{field}#cell={cell.index}"
    score(factory, "SLIDE-F", MODEL, [CellResult(uri, 0.9, True, None, info)])
    with transaction(factory) as s:
        reviews.record_verdict(
            session=s,
            sample_id="SLIDE-F",
            model_version=MODEL,
            image_uri=uri,
            agree=False,
            corrected_class="hem",
            reviewer="ann",
        )
    engine.dispose()

    out = tmp_path / "export"
    summary = export_reviewed(out, database_url=url)
    assert summary.written == {"all": 0, "hem": 1}
    (crop_path,) = (out / "hem").iterdir()
    with Image.open(crop_path) as im:
        crop = np.asarray(im.convert("RGB"))
    assert crop.shape == (450, 450, 3)
    lit = crop.max(axis=2) > 0
    ys, xs = np.nonzero(lit)
    assert abs(xs.mean() - 224.5) < 3 and abs(ys.mean() - 224.5) < 3
    # its area at the C-NMC scale is the cell's area (the outline is a 48-point polygon: a few % smaller)
    assert lit.sum() * CNMC_UM_PER_PX**2 == pytest.approx(cell.area_um2, rel=0.08)
    assert json.loads((out / "allscore-data.json").read_text())["um_per_px"] == CNMC_UM_PER_PX

"""Synthetic smear fields: deterministic, truth that matches the pixels, sizes kept in um, crops, the command."""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from trainer.dataset import DatasetError
from trainer.synth import RADIUS, SYNTH_UM_PER_PX
from trainer.synth_fields import TRUTH_COLUMNS, FieldsSummary, synthesize_fields

SMALL = {"fields": 3, "cells_per_field": 5, "width": 512, "height": 384, "all_fraction": 0.5, "touching": 0.4}
SCALES = (0.08, 0.16)


def _truth(root: Path) -> list[dict[str, str]]:
    with (root / "truth.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == TRUTH_COLUMNS
        return list(reader)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.*"))}


def _pixels(root: Path, field: str) -> np.ndarray:
    with Image.open(root / field) as image:
        assert image.mode == "RGB"
        return np.asarray(image).astype(int)


def _stained(pixel: np.ndarray) -> bool:
    """A white cell's purple: blue well above green, and dark (the background and red cells are light)."""
    red, green, blue = (int(v) for v in pixel)
    return blue - green > 25 and red > green and green < 120


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> FieldsSummary:
    out = tmp_path_factory.mktemp("fields") / "out"
    return synthesize_fields(out, um_per_px=SCALES, seed=3, crops=True, one_scale=False, **SMALL)


def test_fields_are_deterministic_for_a_seed(tmp_path: Path, small: FieldsSummary) -> None:
    again = synthesize_fields(tmp_path / "again", um_per_px=SCALES, seed=3, crops=True, one_scale=False, **SMALL)
    other = synthesize_fields(tmp_path / "other", um_per_px=SCALES, seed=4, one_scale=False, **SMALL)
    assert _digest(again.root) == _digest(small.root)
    assert _digest(other.root)["fields/field_001.png"] != _digest(small.root)["fields/field_001.png"]
    # Writing the crops takes nothing from the random streams: the fields are the same either way.
    fields_only = {k: v for k, v in _digest(small.root).items() if k.startswith("fields/")}
    plain = synthesize_fields(tmp_path / "plain", um_per_px=SCALES, seed=3, one_scale=False, **SMALL)
    assert {k: v for k, v in _digest(plain.root).items() if k.startswith("fields/")} == fields_only


def test_truth_rows_match_the_fields_written(small: FieldsSummary) -> None:
    rows = _truth(small.root)
    written = sorted(str(p.relative_to(small.root)) for p in (small.root / "fields").iterdir())
    assert written == [f"fields/field_{i:03d}.png" for i in range(1, 4)]
    assert sorted({r["field"] for r in rows}) == written
    assert len(rows) == small.n_cells and small.n_fields == 3
    assert sum(r["label"] == "all" for r in rows) == small.n_all
    assert {r["label"] for r in rows} <= {"all", "hem"}
    assert "3 synthetic fields" in small.describe()
    for field in written:
        mine = [r for r in rows if r["field"] == field]
        assert [int(r["index"]) for r in mine] == list(range(1, len(mine) + 1))
        assert len(mine) >= 4  # five asked for; one may not fit in a small field
        assert len({r["um_per_px"] for r in mine}) == 1
        with Image.open(small.root / field) as image:
            assert (image.format, image.size) == ("PNG", (512, 384))
    scales = {float(r["um_per_px"]) for r in rows}
    assert len(scales) == 3 and all(SCALES[0] <= s <= SCALES[1] for s in scales)


def test_every_white_cell_centroid_is_stained(small: FieldsSummary) -> None:
    for row in _truth(small.root):
        pixels = _pixels(small.root, row["field"])
        x, y = round(float(row["x"])), round(float(row["y"]))
        assert _stained(pixels[y, x]), (row, pixels[y, x])
        assert row["edge"] in {"0", "1"}
        if row["edge"] == "0":  # wholly inside: the cell's radius fits between the centroid and each side
            radius = float(row["radius_px"])
            assert radius < x < 512 - radius and radius < y < 384 - radius


def test_cells_keep_their_size_in_micrometres_across_field_scales(small: FieldsSummary) -> None:
    low = 2 * 0.12 * 450 * SYNTH_UM_PER_PX  # render_cell's smallest and largest radius, as a diameter
    high = 2 * 0.40 * 450 * SYNTH_UM_PER_PX
    by_scale: dict[str, list[float]] = {}
    for row in _truth(small.root):
        diameter, scale = float(row["diameter_um"]), float(row["um_per_px"])
        assert low < diameter < high
        assert diameter == pytest.approx(2 * float(row["radius_px"]) * scale, rel=0.01)
        by_scale.setdefault(row["um_per_px"], []).append(diameter)
        # The same cell's crop, at the C-NMC scale: its area in um2 is the field cell's (an edge cell's crop holds
        # only the part the field shows).
        with Image.open(small.root / row["crop"]) as crop:
            area = float((np.asarray(crop).max(axis=2) > 10).sum()) * SYNTH_UM_PER_PX**2
        if row["edge"] == "0":
            assert diameter == pytest.approx(2 * math.sqrt(area / math.pi), rel=0.04)
        else:
            assert 2 * math.sqrt(area / math.pi) < diameter
    means = [float(np.mean(d)) for d in by_scale.values()]
    typical = 2 * np.mean(RADIUS) * 450 * SYNTH_UM_PER_PX
    assert all(0.7 * typical < m < 1.3 * typical for m in means)


def test_red_cells_cover_a_good_part_of_each_field(small: FieldsSummary) -> None:
    for field in sorted({r["field"] for r in _truth(small.root)}):
        red, green, blue = np.moveaxis(_pixels(small.root, field), 2, 0)
        pink = (red - green > 35) & (np.abs(blue - green) < 30) & (red > 150)
        background = (red > 200) & (green > 195) & (red - green < 25)
        assert 0.2 < pink.mean() < 0.7
        assert background.mean() > 0.2


def test_crops_are_written_and_labelled_as_the_truth_says(small: FieldsSummary) -> None:
    rows = _truth(small.root)
    crops = sorted(str(p.relative_to(small.root)) for p in (small.root / "crops").rglob("*.bmp"))
    assert sorted(r["crop"] for r in rows) == crops
    for row in rows:
        assert row["crop"].startswith(f"crops/{row['label']}/cell_")
        with Image.open(small.root / row["crop"]) as image:
            assert (image.format, image.mode, image.size) == ("BMP", "RGB", (450, 450))
            pixels = np.asarray(image)
        assert pixels[0, 0].tolist() == [0, 0, 0]  # one cell on black, as C-NMC


def test_some_cells_touch_and_some_are_cut_by_the_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.synth_fields as synth_fields

    monkeypatch.setattr(synth_fields, "EDGE_PROBABILITY", 1.0)
    summary = synthesize_fields(tmp_path / "out", fields=2, cells_per_field=7, width=640, height=480, touching=1.0)
    rows = _truth(summary.root)
    touching = 0
    for field in {r["field"] for r in rows}:
        mine = [r for r in rows if r["field"] == field]
        pixels = _pixels(summary.root, field)
        for i, a in enumerate(mine):
            for b in mine[i + 1 :]:
                gap = math.dist((float(a["x"]), float(a["y"])), (float(b["x"]), float(b["y"])))
                touching += gap < 1.3 * (float(a["radius_px"]) + float(b["radius_px"]))
        for row in mine:
            x, y = round(float(row["x"])), round(float(row["y"]))
            assert _stained(pixels[y, x])
    assert touching >= 2
    edge = [r for r in rows if r["edge"] == "1"]
    assert edge
    for row in edge:  # the edge runs within a radius of the (visible part's) centroid
        x, y, radius = float(row["x"]), float(row["y"]), float(row["radius_px"])
        assert min(x, y, 640 - x, 480 - y) < radius


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fields": 0}, "at least one field"),
        ({"cells_per_field": 0}, "at least one white cell"),
        ({"all_fraction": 1.5}, "between 0 and 1"),
        ({"touching": -0.1}, "between 0 and 1"),
        ({"um_per_px": (0.2, 0.1)}, "low <= high"),
        ({"width": 64}, "at least 128x128"),
        ({"cytoplasm_opacity": 0.0}, "above 0 and at most 1"),
    ],
)
def test_synthesize_fields_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        synthesize_fields(tmp_path / "out", **kwargs)  # type: ignore[arg-type]


def test_synthesize_fields_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not an empty folder"):
        synthesize_fields(tmp_path / "out")


def test_the_command_writes_fields(tmp_path: Path) -> None:
    from allscore.cli import app

    out = tmp_path / "cli"
    args = ["data", "synth-fields", str(out), "--fields", "1", "--cells-per-field", "3", "--all-fraction", "1"]
    result = CliRunner().invoke(app, [*args, "--seed", "2", "--crops"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    rows = _truth(out)
    assert len(rows) == 3 and {r["label"] for r in rows} == {"all"}
    assert (out / "fields" / "field_001.png").is_file()
    assert len(list((out / "crops" / "all").glob("*.bmp"))) == 3


@pytest.mark.parametrize("scale_given", [True, False])
def test_the_field_segmenter_finds_the_white_cells(tmp_path: Path, scale_given: bool) -> None:
    # Cells apart (touching ones are a harder case, measured separately): every white cell found once, near its
    # true centroid, with and without being told the scale.
    segment = pytest.importorskip("core.segment")
    summary = synthesize_fields(
        tmp_path / "out",
        fields=3,
        cells_per_field=4,
        width=640,
        height=480,
        touching=0.0,
        seed=5,
        um_per_px=SCALES,
        one_scale=False,  # three magnifications
    )
    rows = _truth(summary.root)
    matched = found = 0
    for field in sorted({r["field"] for r in rows}):
        truth = [r for r in rows if r["field"] == field]
        scale = float(truth[0]["um_per_px"])
        pixels = _pixels(summary.root, field).astype(np.uint8)
        result = segment.segment_field(pixels, um_per_px=scale if scale_given else None)
        hits: set[int] = set()
        for cell in result.cells:
            found += 1
            distances = [math.dist(cell.centroid, (float(r["x"]), float(r["y"]))) for r in truth]
            nearest = int(np.argmin(distances))
            if distances[nearest] <= float(truth[nearest]["radius_px"]) and nearest not in hits:
                hits.add(nearest)
                assert distances[nearest] * scale < 3.0  # um
                assert cell.edge == (truth[nearest]["edge"] == "1")
        matched += len(hits)
    assert matched / len(rows) >= 0.95  # recall
    assert matched / found >= 0.95  # precision


def test_a_slide_is_imaged_at_one_magnification_by_default(tmp_path: Path) -> None:
    # The worker estimates one scale per sample (a slide): by default every field of a run shares one scale.
    summary = synthesize_fields(tmp_path / "out", fields=3, cells_per_field=2, width=320, height=240, seed=9)
    scales = {r["um_per_px"] for r in _truth(summary.root)}
    assert len(scales) == 1 and SCALES[0] <= float(scales.pop()) <= SCALES[1]

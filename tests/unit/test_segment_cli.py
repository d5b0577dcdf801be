"""`allscore segment`: the JSON-lines contract, the crops, and the round trip a lab makes to train on its slides.

Synthetic fields (trainer.synth_fields, SYNTHETIC cells with a known class each) are cut into crops, a "person"
sorts the crops into all/ and hem/ by the truth, and `allscore train` takes the folder with the slide as subject.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from allscore.cli import app

KEYS = {"field", "index", "bbox", "centroid", "area_um2", "kind", "edge", "crop", "um_per_px", "scale_source"}


def _slide(root: Path, name: str, seed: int) -> tuple[Path, list[dict[str, str]]]:
    from trainer.synth_fields import synthesize_fields

    out = root / name
    synthesize_fields(out, fields=2, cells_per_field=8, all_fraction=0.5, width=640, height=480, seed=seed)
    with (out / "truth.csv").open() as fh:
        return out / "fields", list(csv.DictReader(fh))


def _truth_of(record: dict, truth: list[dict[str, str]]) -> dict[str, str] | None:
    """The truth cell of the same field nearest the found centroid, within its radius."""
    field = Path(record["field"]).name
    x, y = record["centroid"]
    best, where = None, math.inf
    for row in truth:
        if Path(row["field"]).name != field:
            continue
        d = math.hypot(float(row["x"]) - x, float(row["y"]) - y)
        if d < where and d <= float(row["radius_px"]):
            best, where = row, d
    return best


@pytest.mark.slow
def test_segment_writes_crops_and_json_lines_that_train_takes_after_sorting(tmp_path: Path) -> None:
    runner = CliRunner()
    sorted_root = tmp_path / "reviewed"
    for number, name in enumerate(("slide-a", "slide-b", "slide-c")):
        fields, truth = _slide(tmp_path / "made", name, seed=number)
        out = tmp_path / "crops" / name
        result = runner.invoke(app, ["segment", str(fields), "--out", str(out), "--slide", name, "--json"])
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert records and all(set(r) == KEYS for r in records)
        for record in records:
            x0, y0, x1, y1 = record["bbox"]
            assert x0 < record["centroid"][0] < x1 and y0 < record["centroid"][1] < y1
            assert (record["crop"] is None) == record["edge"]
            if record["crop"] is None:
                continue
            crop = out / record["crop"]
            with Image.open(crop) as im:
                assert (im.format, im.size, im.mode) == ("BMP", (450, 450), "RGB")
                pixels = np.asarray(im)
            assert pixels[0, 0].sum() == 0 and pixels[225, 225].sum() > 0  # black outside, the cell at the centre
            # What a person does: look at each lymphoid crop and put it where it belongs.
            row = _truth_of(record, truth)
            if record["kind"] != "lymphoid" or row is None:
                continue
            target = sorted_root / row["label"] / crop.name
            target.parent.mkdir(parents=True, exist_ok=True)
            crop.rename(target)
        assert json.loads((out / "allscore-data.json").read_text())["um_per_px"] > 0
    names = {p.name.split("_")[1] for p in sorted_root.rglob("*.bmp")}
    assert names == {"slide-a", "slide-b", "slide-c"}
    (sorted_root / "allscore-data.json").write_text((out / "allscore-data.json").read_text())

    store = tmp_path / "store"
    result = runner.invoke(
        app,
        [
            "train",
            str(sorted_root),
            "--out",
            str(store),
            "--name",
            "lab",
            "--arch",
            "tiny",
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--val-fraction",
            "0.34",
        ],
    )
    assert result.exit_code == 0, result.output
    ref = result.stdout.strip().splitlines()[-1]
    assert ref.startswith("lab:")
    manifest = json.loads(next(store.rglob("manifest.json")).read_text())
    # The slides are the subjects, split by subject, and the crops' scale is the model's training scale.
    assert set(manifest["train_subjects"]) | set(manifest["val_subjects"]) == {"slide-a", "slide-b", "slide-c"}
    assert not set(manifest["train_subjects"]) & set(manifest["val_subjects"])
    assert manifest["um_per_px"] == pytest.approx(json.loads((out / "allscore-data.json").read_text())["um_per_px"])


def test_segment_refuses_nothing_silently_a_bad_field_is_named_and_exit_code_1(tmp_path: Path) -> None:
    fields, _ = _slide(tmp_path / "made", "slide-x", seed=5)
    (fields / "broken.png").write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["segment", str(fields), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "broken.png" in result.output
    assert list((tmp_path / "out").glob("UID_*.bmp")), "the good fields were still cut"

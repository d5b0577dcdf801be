"""worker.report.render_montage: the PNG an analyst opens to review a sample's cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import encode
from worker.report import COLORS, FRAME, LABEL_H, THUMB, render_montage


def _sample(sample_id: str, n_all: int, n_cells: int, n_failed: int) -> dict[str, object]:
    return {
        "sample_id": sample_id,
        "model_version": "allscore:20261126-061307",
        "all_fraction": n_all / (n_cells - n_failed),
        "ci_low": 0.01,
        "ci_high": 0.99,
        "n_all": n_all,
        "n_cells": n_cells,
        "n_failed": n_failed,
    }


def _cells(tmp_path: Path, probabilities: list[float | None]) -> list[dict[str, object]]:
    cells = []
    for i, p in enumerate(probabilities):
        path = tmp_path / f"cell-{i}.bmp"
        path.write_bytes(encode(np.full((64, 64, 3), 40 + 20 * i, dtype=np.uint8)))
        cells.append({"image_uri": str(path), "p_all": p, "is_all": None if p is None else p >= 0.5})
    return cells


def test_cells_are_framed_by_their_call_highest_probability_first(tmp_path: Path) -> None:
    cells = _cells(tmp_path, [0.2, None, 0.9])
    png = render_montage(_sample("SLIDE-1", 1, 3, 1), cells, tmp_path / "out")
    image = np.asarray(Image.open(png).convert("RGB"))
    tile = THUMB + 2 * FRAME
    header = image.shape[0] - 2 * (tile + LABEL_H)  # two rows of tiles under the header
    # Order: 0.9 (ALL, red), 0.2 (hem, green), then the unreadable cell (grey), two tiles a row.
    frames = [image[header + 1, 1], image[header + 1, tile + 1], image[header + tile + LABEL_H + 1, 1]]
    assert [tuple(int(v) for v in f) for f in frames] == [COLORS["all"], COLORS["hem"], COLORS["error"]]


def test_the_header_is_not_cut_off_when_the_sample_has_few_cells(tmp_path: Path) -> None:
    long_id = "RUN-2026-11-26-SLIDE-000042-BONE-MARROW-ASPIRATE"
    png = render_montage(_sample(long_id, 1, 1, 0), _cells(tmp_path, [0.9]), tmp_path / "out")
    image = np.asarray(Image.open(png).convert("L"))
    band = image[:38]  # the title and the legend
    inked = np.nonzero((band < 200).any(axis=0))[0]
    assert inked.size, "the header has no text"
    assert inked.max() < image.shape[1] - 3, "the title runs into the right edge: it is cut off"

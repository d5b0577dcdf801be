"""Synthetic C-NMC cells: read by the loader, disjoint folds, deterministic, measured class differences."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.dataset import DatasetError, split_by_subject
from trainer.discovery import discover
from trainer.synth import SynthSummary, render_cell, subject_tint, synthesize, write_sample

# Pixels brighter than this in any channel belong to the cell; the background is black.
CELL_THRESHOLD = 10


def _cell_area(pixels: np.ndarray) -> float:
    return float((pixels.max(axis=2) > CELL_THRESHOLD).mean())


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.bmp"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return synthesize(tmp_path_factory.mktemp("synth") / "data", subjects=6, cells=6, seed=3)


def test_synth_output_is_a_cnmc_data_set_with_disjoint_folds(small_set: SynthSummary) -> None:
    ds = discover(small_set.root)

    assert ds.skipped == []
    assert ds.folds == ["0", "1", "2"]
    fold_subjects = {fold: {c.subject for c in ds.cells if c.fold == fold} for fold in ds.folds}
    assert fold_subjects == {fold: set(subjects) for fold, subjects in small_set.folds.items()}
    for fold, subjects in fold_subjects.items():
        others = set().union(*(s for f, s in fold_subjects.items() if f != fold))
        assert not subjects & others
        assert {s.startswith("H") for s in subjects} == {True, False}  # both classes in every fold
    assert ds.class_counts() == {"all": small_set.n_all, "hem": small_set.n_hem}
    assert small_set.n_all == 3 * 6 and small_set.n_hem == 3 * 3  # healthy subjects have half the cells
    for cell in ds.cells:
        with Image.open(cell.path) as image:
            assert (image.format, image.mode, image.size) == ("BMP", "RGB", (450, 450))
    train, val = split_by_subject(ds)
    assert not set(train.subjects) & set(val.subjects)


def test_synth_is_deterministic_for_a_seed(tmp_path: Path, small_set: SynthSummary) -> None:
    again = synthesize(tmp_path / "again", subjects=6, cells=6, seed=3)
    other = synthesize(tmp_path / "other", subjects=6, cells=6, seed=4)
    assert _digest(again.root) == _digest(small_set.root)
    assert _digest(other.root).keys() == _digest(small_set.root).keys()
    assert _digest(other.root) != _digest(small_set.root)


def test_malignant_cells_are_larger_on_average_with_overlap(small_set: SynthSummary) -> None:
    ds = discover(small_set.root)
    areas: dict[int, list[float]] = {0: [], 1: []}
    for cell in ds.cells:
        with Image.open(cell.path) as image:
            areas[cell.label].append(_cell_area(np.asarray(image)))
    assert np.mean(areas[1]) > 1.2 * np.mean(areas[0])

    # Many more single cells: the classes differ on average but overlap (some cells are ambiguous).
    rng = np.random.default_rng(11)
    normal = [_cell_area(render_cell(rng, False, None, 150)) for _ in range(60)]
    malignant = [_cell_area(render_cell(rng, True, None, 150)) for _ in range(60)]
    assert np.mean(malignant) > np.mean(normal)
    assert max(normal) > min(malignant)


def test_a_subject_stain_tints_its_cells() -> None:
    # The same cell (same random stream) under a subject's tint: its colour shifts by that tint.
    tint = np.array([1.08, 1.0, 0.92])
    plain = render_cell(np.random.default_rng(5), True, None, 150).astype(float)
    tinted = render_cell(np.random.default_rng(5), True, tint, 150).astype(float)
    inside = plain.max(axis=2) > 40  # away from the anti-aliased edge, where rounding dominates
    ratio = tinted[inside].mean(axis=0) / plain[inside].mean(axis=0)
    assert np.allclose(ratio, tint, atol=0.02)

    # Subjects' tints differ from one another, in every channel.
    tints = np.array([subject_tint(np.random.default_rng(i)) for i in range(200)])
    assert (tints.std(axis=0) > 0.03).all()


def test_render_cell_is_a_stained_cell_on_black() -> None:
    pixels = render_cell(np.random.default_rng(0), True, subject_tint(np.random.default_rng(1)), 450)
    assert pixels.shape == (450, 450, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[-1, -1].tolist() == [0, 0, 0]
    inside = pixels[pixels.max(axis=2) > CELL_THRESHOLD].astype(float)
    assert 0.05 < len(inside) / (450 * 450) < 0.6
    red, green, blue = inside.mean(axis=0)
    assert blue > green and red > green  # purple, like the C-NMC stain


def test_write_sample_writes_a_slide(tmp_path: Path) -> None:
    paths = write_sample(tmp_path / "mixed", 12, 0.25, seed=1)
    assert [p.name for p in paths] == [f"cell_{i:04d}.bmp" for i in range(1, 13)]
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == [p.name for p in paths]
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("BMP", (450, 450))

    # The fraction decides the cells' class: an all-malignant slide has larger cells than a normal one.
    blasts = write_sample(tmp_path / "blasts", 12, 1.0, seed=1, size=150)
    normal = write_sample(tmp_path / "normal", 12, 0.0, seed=1, size=150)

    def mean_area(ps: list[Path]) -> float:
        return float(np.mean([_cell_area(np.asarray(Image.open(p))) for p in ps]))

    assert mean_area(blasts) > mean_area(normal)
    assert write_sample(tmp_path / "again", 12, 0.25, seed=1)[0].read_bytes() == paths[0].read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"subjects": 4}, "at least 6"), ({"cells": 1}, "at least 2"), ({"size": 16}, "at least 32")],
)
def test_synthesize_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        synthesize(tmp_path / "out", **kwargs)


def test_synthesize_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not an empty folder"):
        synthesize(tmp_path / "out", subjects=6, cells=2)
    with pytest.raises(DatasetError, match="between 0 and 1"):
        write_sample(tmp_path / "sample", 4, 1.5)

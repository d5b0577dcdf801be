"""The subject tint of the synthetic generator is a parameter (`allscore data synth --tint`): how much each
subject's stain differs, the confound that lets a model learn subjects instead of cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from trainer.dataset import DatasetError
from trainer.synth import subject_tint, synthesize


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.10, 0.2])
def test_the_tints_spread_as_asked(strength: float) -> None:
    gains = np.array([subject_tint(np.random.default_rng(i), strength) for i in range(400)])
    brightness = gains.mean(axis=1)
    colour = gains / brightness[:, None]  # each channel's gain once the mean of the three is taken out
    # gains = b (1 + s e_c), b ~ 1 + 1.2 s n: taking out the mean of three leaves sqrt(2/3) s per channel, and the
    # mean of three holds sqrt(1.2^2 + 1/3) s
    assert colour.std(axis=0) == pytest.approx([strength * (2 / 3) ** 0.5] * 3, abs=0.005 + 0.1 * strength)
    assert brightness.std() == pytest.approx(strength * (1.44 + 1 / 3) ** 0.5, abs=0.005 + 0.1 * strength)


def _subject_colours(root: Path) -> list[np.ndarray]:
    by_subject: dict[str, list[np.ndarray]] = {}
    for path in sorted(root.rglob("*.bmp")):
        with Image.open(path) as im:
            px = np.asarray(im, dtype=np.float64).reshape(-1, 3)
        inside = px[px.max(axis=1) > 40]
        by_subject.setdefault(path.name.split("_")[1], []).append(inside.mean(axis=0))
    return [np.mean(v, axis=0) for v in by_subject.values()]


def test_a_higher_tint_makes_subjects_differ_more_and_the_cli_takes_it(tmp_path: Path) -> None:
    from allscore.cli import app

    for tint in ("0.0", "0.2"):
        result = CliRunner().invoke(
            app, ["data", "synth", str(tmp_path / tint), "--subjects", "6", "--cells", "6", "--tint", tint]
        )
        assert result.exit_code == 0, result.output
    flat = np.std(_subject_colours(tmp_path / "0.0"), axis=0)
    tinted = np.std(_subject_colours(tmp_path / "0.2"), axis=0)
    assert (tinted > 2 * flat).all(), (flat, tinted)


def test_a_tint_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"tint=0\.5"):
        synthesize(tmp_path / "x", subjects=6, cells=2, size=32, tint=0.5)


def test_a_set_from_subject_101_holds_other_subjects(tmp_path: Path) -> None:
    from trainer.discovery import discover

    synthesize(tmp_path / "train", subjects=6, cells=3, size=32)
    synthesize(tmp_path / "held", subjects=6, cells=3, size=32, first_subject=101)
    train, held = discover(tmp_path / "train"), discover(tmp_path / "held")
    assert sorted(train.subjects) == ["1", "2", "3", "H1", "H2", "H3"]
    assert sorted(held.subjects) == ["101", "102", "103", "H101", "H102", "H103"]
    assert held.folds == ["0", "1", "2"]  # one subject of each class per fold, as from 1
    # other subjects: other stains and cells (the same seed draws per subject number)
    a = np.asarray(Image.open(sorted((tmp_path / "train").rglob("*.bmp"))[0]))
    b = np.asarray(Image.open(sorted((tmp_path / "held").rglob("*.bmp"))[0]))
    assert not np.array_equal(a, b)

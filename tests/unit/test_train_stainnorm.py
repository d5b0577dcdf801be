"""Training with per-sample stain normalisation (`allscore train --stain-norm sample`): the version records the
training set's colour statistics as its target, each subject was normalised with its own, and `allscore evaluate`
reads a subject as one slide."""

from __future__ import annotations

import numpy as np
import pytest

from core.artifact import Registry
from core.stainnorm import fit
from tests.fixtures import PublishedModel
from trainer.dataset import split_by_subject
from trainer.discovery import discover
from trainer.loading import decode_cells


def test_the_version_records_the_training_cells_statistics_as_its_target(stain_model: PublishedModel) -> None:
    manifest = stain_model.manifest
    assert manifest.stain_norm is not None and manifest.stain_norm.method == "reinhard-lab"
    # The target is the colour statistics of the training cells as decoded for the model (validation excluded).
    train_ds, _ = split_by_subject(discover(stain_model.data))
    expected = fit(decode_cells(train_ds.cells, manifest.input_size).images)
    target = manifest.stain_norm.target()
    assert target.mean == pytest.approx(expected.mean, abs=1e-5)
    assert target.std == pytest.approx(expected.std, abs=1e-5)
    assert manifest.stain_norm.target_cells == manifest.n_train_cells == len(train_ds.cells)
    assert manifest.training["stain_norm"] == "sample"
    # Published and fetched back, the record is the same.
    _, fetched = Registry(stain_model.store).fetch(stain_model.ref)
    assert fetched.stain_norm == manifest.stain_norm


def test_a_version_without_it_records_none(tiny_model: PublishedModel) -> None:
    assert tiny_model.manifest.stain_norm is None
    assert tiny_model.manifest.training["stain_norm"] == "none"


def test_evaluate_normalises_each_subject_as_a_slide(stain_model: PublishedModel) -> None:
    from core.artifact import load_keras
    from core.calibration import apply_temperature
    from core.stainnorm import normalise_groups
    from trainer.evaluate import evaluate

    result = evaluate(stain_model.ref, stain_model.data, store=stain_model.store)
    assert result["stain_norm"] == "per subject"
    # Its calls are the model's on each subject's cells normalised with that subject's own statistics.
    manifest = stain_model.manifest
    arrays = decode_cells([c for c in discover(stain_model.data).cells if c.label is not None], manifest.input_size)
    x = normalise_groups(arrays.images, arrays.subjects, manifest.stain_norm.target())  # type: ignore[union-attr]
    model = load_keras(Registry(stain_model.store).fetch(stain_model.ref)[0])
    p = apply_temperature(np.asarray(model(x, training=False)).reshape(-1), manifest.temperature)
    calls = p >= manifest.threshold
    assert result["confusion"]["tp"] == int(np.sum(calls & (arrays.labels == 1)))
    assert result["confusion"]["fp"] == int(np.sum(calls & (arrays.labels == 0)))


def test_the_cli_refuses_an_unknown_normalisation_before_training(synth_data: object, tmp_path: object) -> None:
    from typer.testing import CliRunner

    from allscore.cli import app

    result = CliRunner().invoke(app, ["train", str(synth_data), "--out", str(tmp_path), "--stain-norm", "macenko"])
    assert result.exit_code == 2 and "--stain-norm 'macenko': choose 'none' or 'sample'" in result.output

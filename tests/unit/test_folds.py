"""K-fold training (`allscore train --folds K`, trainer/folds.py) on a small synthetic set with tiny models: every
subject is held out by exactly one fold model, the threshold comes from out-of-fold predictions only, and the
published version is one graph serving the fold models' mean probability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from core.artifact import load_model
from core.calibration import apply_temperature
from core.inference import ServingModel, predict_proba
from trainer.dataset import DatasetError
from trainer.discovery import discover
from trainer.export import as_served
from trainer.folds import subject_groups, train_folds
from trainer.loading import decode_cells
from trainer.metrics import choose_threshold
from trainer.train import TrainConfig, TrainOutcome, publish

# With per-sample stain normalisation: every fold is normalised onto one target, the one the ensemble serves.
CONFIG = TrainConfig(
    name="folds", arch="tiny", image_size=32, epochs=3, patience=3, seed=0, version="v1", stain_norm="sample"
)


@pytest.fixture(scope="module")
def outcome(synth_data: Path) -> TrainOutcome:
    return train_folds(synth_data, CONFIG, 3, Console(stderr=True, quiet=True))


def test_groups_are_the_data_sets_folds_or_dealt_out_by_class(synth_data: Path) -> None:
    ds = discover(synth_data)
    groups, how = subject_groups(ds, 3)
    assert "folds 0, 1, 2" in how
    assert groups == [sorted({c.subject for c in ds.cells if c.fold == f and c.subject}) for f in ds.folds]
    groups, how = subject_groups(ds, 2, seed=5)
    assert "dealt out by class" in how
    assert sorted(s for g in groups for s in g) == sorted(ds.subjects)  # each subject in exactly one group
    classes = {c.subject: c.label for c in ds.cells}
    assert all({classes[s] for s in g} == {0, 1} for g in groups)
    with pytest.raises(DatasetError, match="use fewer folds"):
        subject_groups(ds, 4)


def test_every_subject_is_held_out_once_and_the_threshold_is_out_of_fold(
    outcome: TrainOutcome, synth_data: Path
) -> None:
    manifest = outcome.manifest
    folds = manifest.training["per_fold"]
    subjects = sorted(discover(synth_data).subjects)
    held = [s for f in folds for s in f["held_out_subjects"]]
    assert sorted(held) == subjects  # every subject held out, exactly once
    for f in folds:
        # no fold model predicts a subject it trained on: the OOF predictions choose the threshold
        assert not set(f["held_out_subjects"]) & set(f["trained_on_subjects"])
        assert sorted(f["held_out_subjects"] + f["trained_on_subjects"]) == subjects
    assert manifest.validation.n_subjects == len(subjects)
    assert manifest.validation.n_cells == sum(f["n_held_out_cells"] for f in folds)
    thresholds = manifest.training["fold_thresholds"]
    assert thresholds == [f["threshold"] for f in folds] and len(thresholds) == 3
    assert manifest.training["fold_threshold_spread"] == pytest.approx(max(thresholds) - min(thresholds), abs=1e-4)
    assert "out-of-fold" in manifest.threshold_criterion
    calibration = manifest.training["calibration"]
    assert manifest.temperature == pytest.approx(calibration["temperature"], abs=1e-4) and manifest.temperature > 0
    assert 0 <= calibration["ece_oof"] <= 1 and 0 <= calibration["ece_oof_before"] <= 1


def test_the_threshold_is_the_one_the_oof_predictions_choose(outcome: TrainOutcome, synth_data: Path) -> None:
    # Recompute the out-of-fold predictions from the ensemble's own members: member i on its held-out subjects.
    ds = discover(synth_data)
    members = [layer for layer in outcome.model.layers if hasattr(layer, "layers")]
    assert len(members) == 3
    labels, probs = [], []
    for member, fold in zip(members, outcome.manifest.training["per_fold"], strict=True):
        cells = [c for c in ds.cells if c.subject in set(fold["held_out_subjects"])]
        arrays = decode_cells(cells, 32)
        labels.append(arrays.labels)
        # as a worker serves them: each subject (a slide) normalised with its own statistics
        probs.append(predict_proba(member, as_served(outcome.manifest, arrays.images, arrays.subjects)))
    # on the calibrated scale the workers serve (the version's temperature, fitted on the same OOF predictions)
    calibrated = apply_temperature(np.concatenate(probs), outcome.manifest.temperature)
    assert outcome.manifest.threshold == pytest.approx(choose_threshold(np.concatenate(labels), calibrated))


def test_every_fold_is_normalised_onto_the_whole_data_sets_statistics(outcome: TrainOutcome, synth_data: Path) -> None:
    from core.stainnorm import fit

    record = outcome.manifest.stain_norm
    assert record is not None
    everything = decode_cells(discover(synth_data).cells, 32).images
    assert record.target().mean == pytest.approx(fit(everything).mean, abs=1e-5)
    assert record.target_cells == len(everything)


def test_the_published_version_serves_the_mean_of_the_fold_models(
    outcome: TrainOutcome, synth_data: Path, tmp_path: Path
) -> None:
    manifest = publish(outcome, str(tmp_path / "store"))
    loaded = load_model(manifest.ref, store=str(tmp_path / "store"))
    assert loaded.manifest.architecture == "ensemble of 3 tiny"
    images = decode_cells(discover(synth_data).cells[:40], 32).images
    members = [layer for layer in outcome.model.layers if hasattr(layer, "layers")]
    mean = np.mean([predict_proba(m, images) for m in members], axis=0)
    served = predict_proba(ServingModel(loaded.model), images)  # what a worker runs, one forward pass
    np.testing.assert_allclose(served, mean, atol=1e-5)
    # the serving export of the ensemble (one ONNX graph), checked against model.keras at publish
    assert "onnx" in loaded.manifest.exports
    assert (tmp_path / "store" / "folds" / "v1" / "model.onnx").exists()


def test_the_cli_trains_folds_and_refuses_a_validation_fold_with_them(synth_data: Path, tmp_path: Path) -> None:
    from allscore.cli import app

    base = ["train", str(synth_data), "--out", str(tmp_path / "store"), "--arch", "tiny", "--image-size", "32"]
    refused = CliRunner().invoke(app, [*base, "--folds", "2", "--val-fold", "2"])
    assert refused.exit_code != 0 and "--folds K holds out every subject once" in refused.output
    result = CliRunner().invoke(app, [*base, "--folds", "2", "--epochs", "1", "--name", "cli", "--version", "v1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "cli:v1"
    assert load_model("cli:v1", store=str(tmp_path / "store")).manifest.training["folds"] == 2

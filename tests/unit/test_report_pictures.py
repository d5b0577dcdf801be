"""The training report's pictures: right numbers in, real PNGs out, published only when the manifest lists them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.artifact import Registry
from core.manifest import ModelError, ModelManifest, ValidationMetrics
from trainer.report_pictures import PICTURES, roc_points, training_report


def test_roc_points_of_a_known_ranking() -> None:
    labels = np.array([1, 1, 0, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.6, 0.1])
    fpr, tpr = roc_points(labels, p)
    # Thresholds 0.9, 0.8, 0.7, 0.6 (a tie: one positive, one negative at once), 0.1.
    assert fpr.tolist() == pytest.approx([0, 0, 0, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])


def test_training_report_draws_every_picture() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([1] * 30 + [0] * 30)
    p = np.clip(labels * 0.6 + rng.normal(0.2, 0.15, 60), 0, 1)
    subjects = ["1"] * 15 + ["2"] * 15 + ["H1"] * 15 + ["H2"] * 15
    metrics = {
        "auc": 0.97,
        "confusion": {"tp": 28, "fn": 2, "fp": 3, "tn": 27},
        "per_subject_accuracy": {"1": 0.9, "2": 0.97, "H1": 0.93, "H2": 0.87},
    }
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.69, 0.55, 0.5], "val_auc": [0.6, 0.9, 0.95]}
    pictures = training_report(
        labels=labels, p=p, threshold=0.5, metrics=metrics, history=history, subjects=subjects, best_epoch=3
    )
    assert list(pictures) == list(PICTURES)
    for name, png in pictures.items():
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and min(image.size) > 200, name
        # A picture with something drawn on it: many distinct colours, not a blank canvas.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24) or []) > 20, name


def _manifest(pictures: list[str]) -> ModelManifest:
    return ModelManifest(
        name="m",
        version="v1",
        created_at="2026-01-01T00:00:00+00:00",
        architecture="tiny",
        input_size=32,
        threshold=0.5,
        validation=ValidationMetrics(weighted_f1=1.0, auc=1.0, sensitivity=1.0, specificity=1.0, accuracy=1.0),
        train_subjects=["1"],
        val_subjects=["2"],
        sha256="",
        report_pictures=pictures,
    )


def test_pictures_are_published_beside_the_model_only_when_listed(tmp_path: Path) -> None:
    from core.manifest import sha256_file

    model = tmp_path / "model.keras"
    model.write_bytes(b"not really a model")
    roc = tmp_path / "roc.png"
    roc.write_bytes(b"png")
    registry = Registry(str(tmp_path / "store"))
    manifest = _manifest(["roc.png"]).model_copy(update={"sha256": sha256_file(model)})
    registry.publish(model, manifest, [roc])
    assert (tmp_path / "store" / "m" / "v1" / "roc.png").read_bytes() == b"png"
    assert registry.resolve("m:v1").report_pictures == ["roc.png"]
    unlisted = _manifest([]).model_copy(update={"version": "v2", "sha256": sha256_file(model)})
    with pytest.raises(ModelError, match="listed in report_pictures"):
        registry.publish(model, unlisted, [roc])

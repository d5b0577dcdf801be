"""Evaluate a published model on any labelled data set (C-NMC layout or the preliminary CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.artifact import load_model
from core.calibration import apply_temperature
from core.errors import AllscoreError
from core.inference import ServingModel, configure_tensorflow, predict_proba
from core.runtimes import tensorflow_precision
from core.settings import get_settings
from core.tta import averaged
from trainer.discovery import discover
from trainer.export import as_served
from trainer.loading import decode_cells
from trainer.metrics import summarize


class EvaluationError(AllscoreError):
    """A data set that cannot be evaluated (no labelled cells)."""


def evaluate(ref: str, data: Path, *, store: str | None = None) -> dict[str, Any]:
    """Weighted F1, AUC, sensitivity and specificity (positive class `all`) at the manifest's threshold."""
    settings = get_settings()
    configure_tensorflow(settings.tf_threads)
    loaded = load_model(ref, store=store, settings=settings)
    manifest = loaded.manifest
    dataset = discover(data)
    labelled = [c for c in dataset.cells if c.label is not None]
    if not labelled:
        raise EvaluationError(
            f"{data}: no labelled cells found; point at a C-NMC fold tree or a folder with "
            "the preliminary test set's CSV"
        )
    arrays = decode_cells(labelled, manifest.input_size)
    # A subject is one slide: with stain normalisation its cells are normalised as a worker does a sample's.
    arrays.images = as_served(manifest, arrays.images, arrays.subjects)
    # What TensorFlow workers run (an int8 export is ONNX Runtime's: evaluate it with `allscore models export`'s gate).
    model = ServingModel(loaded.model, tensorflow_precision(settings.precision))
    raw = averaged(lambda x: predict_proba(model, x, batch_size=settings.batch_size), arrays.images, settings.tta)
    p = apply_temperature(raw, manifest.temperature)
    metrics = summarize(arrays.labels, p, manifest.threshold, arrays.subjects)
    overlap = sorted(set(manifest.train_subjects) & {s for s in arrays.subjects if s})
    return {
        "model": manifest.ref,
        "data": str(data),
        **metrics,
        "n_failed": len(arrays.failed),
        "precision": model.precision,
        "tta": settings.tta,
        "stain_norm": "per subject" if manifest.stain_norm is not None else "none",
        "subjects_seen_in_training": overlap,
    }

"""Model artifacts for the registry tests: a tiny saved Keras model and a manifest that describes it."""

from __future__ import annotations

from pathlib import Path

from core.manifest import ModelManifest, ValidationMetrics, sha256_file


def save_tiny_model(folder: Path, seed: int = 0) -> tuple[Path, object]:
    """An untrained `tiny` 32x32 model saved as folder/model-SEED.keras; returns the path and the model."""
    from trainer.arch import build_model

    model = build_model("tiny", 32, seed=seed)
    path = folder / f"model-{seed}.keras"
    model.save(path)
    return path, model


def seed_model_with_batch_norm(size: int = 32, seed: int = 1) -> object:
    """An untrained `seed` network whose batch-norm layers hold non-trivial statistics (random gains, offsets, means
    and variances), so that folding them into the convolutions is a real change and outputs differ between cells."""
    import numpy as np
    from keras import layers

    from trainer.arch import build_model

    model = build_model("seed", size, seed=seed)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            g, b, mu, v = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(1.0, 3.0, g.shape),
                    rng.normal(0.5, 0.2, b.shape),
                    rng.normal(0, 0.1, mu.shape),
                    rng.uniform(0.2, 2.0, v.shape),
                ]
            )
    return model


def tiny_manifest(path: Path, version: str = "v1") -> ModelManifest:
    """A manifest for the model file at `path` (its real sha256; fixed subjects and metrics)."""
    return ModelManifest(
        name="tiny",
        version=version,
        created_at="2026-01-01T00:00:00",
        architecture="tiny",
        input_size=32,
        threshold=0.5,
        train_subjects=["1", "H1"],
        val_subjects=["2", "H2"],
        sha256=sha256_file(path),
        validation=ValidationMetrics(weighted_f1=0.9, auc=0.9, sensitivity=0.9, specificity=0.8, accuracy=0.9),
    )


def brightness_model(x: object, training: bool = False) -> object:
    """A stand-in model whose answer a test chooses: p(all) = an image's mean pixel value / 255, shape (N, 1)."""
    import numpy as np

    batch = np.asarray(x)
    return (batch.reshape(len(batch), -1).mean(axis=1) / 255.0).reshape(-1, 1)


def stand_in_manifest(input_size: int, sens: float = 0.9, spec: float = 0.8) -> ModelManifest:
    """The manifest of a stand-in model `fake:1` (no file behind it): threshold 0.5, the given validation figures."""
    metrics = ValidationMetrics(weighted_f1=0.9, auc=0.95, sensitivity=sens, specificity=spec, accuracy=0.9)
    return ModelManifest(
        name="fake",
        version="1",
        created_at="2026-01-01",
        architecture="brightness",
        input_size=input_size,
        threshold=0.5,
        validation=metrics,
        train_subjects=[],
        val_subjects=[],
        sha256="0" * 64,
    )

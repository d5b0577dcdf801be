"""The model artifact: references, publishing, immutability, integrity, safe mode, identical predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.artifact import Registry, load_model
from core.inference import predict_proba
from core.manifest import (
    ModelError,
    ModelIntegrityError,
    ModelManifest,
    ModelNotFound,
    ValidationMetrics,
    VersionExists,
    parse_ref,
    sha256_file,
)
from tests.harness.artifacts import save_tiny_model, tiny_manifest


def test_parse_ref_forms() -> None:
    assert parse_ref("allscore:20260101-000000").version == "20260101-000000"
    assert parse_ref("allscore@production").alias == "production"
    assert parse_ref("allscore").name == "allscore"
    assert parse_ref("s3://bucket/models/allscore/v1/model.keras").uri == "s3://bucket/models/allscore/v1"
    with pytest.raises(ModelError, match="bad name"):
        parse_ref("all score:1")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "store"))


def test_publish_then_load_gives_identical_predictions(tmp_path: Path, registry: Registry) -> None:
    path, model = save_tiny_model(tmp_path)
    registry.publish(path, tiny_manifest(path))
    loaded = load_model("tiny:v1", store=registry.root)
    x = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_proba(model, x, 4), predict_proba(loaded.model, x, 4))
    assert loaded.manifest.positive_class == "all" and loaded.manifest.class_names == ["hem", "all"]


def test_publishing_a_version_twice_is_refused(tmp_path: Path, registry: Registry) -> None:
    path, _ = save_tiny_model(tmp_path)
    registry.publish(path, tiny_manifest(path))
    other, _ = save_tiny_model(tmp_path, seed=1)
    with pytest.raises(VersionExists, match="immutable"):
        registry.publish(other, tiny_manifest(other))
    assert registry.resolve("tiny:v1").sha256 == sha256_file(path)


def test_sha256_mismatch_is_refused(tmp_path: Path, registry: Registry) -> None:
    path, _ = save_tiny_model(tmp_path)
    registry.publish(path, tiny_manifest(path))
    swapped, _ = save_tiny_model(tmp_path, seed=2)
    stored = Path(registry.root) / "tiny" / "v1" / "model.keras"
    stored.write_bytes(swapped.read_bytes())
    with pytest.raises(ModelIntegrityError, match="does not match"):
        load_model("tiny:v1", store=registry.root)


def test_aliases_latest_and_listing(tmp_path: Path, registry: Registry) -> None:
    for i, version in enumerate(("v1", "v2")):
        path, _ = save_tiny_model(tmp_path, seed=i)
        registry.publish(path, tiny_manifest(path, version))
    assert registry.resolve("tiny").version == "v2"  # a bare name is the newest
    registry.promote("tiny:v1", "production")
    assert registry.resolve("tiny@production").version == "v1"
    assert registry.aliases("tiny") == {"production": "v1"}
    assert [m.ref for m in registry.list()] == ["tiny:v1", "tiny:v2"]
    with pytest.raises(ModelNotFound, match="promote"):
        registry.resolve("tiny@staging")
    with pytest.raises(ModelNotFound):
        registry.resolve("nothing:v1")


def test_safe_mode_refuses_a_lambda_layer(tmp_path: Path, registry: Registry) -> None:
    import keras

    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    registry.publish(path, tiny_manifest(path, "lambda"))
    with pytest.raises(ModelError, match="Lambda"):
        load_model("tiny:lambda", store=registry.root)


@pytest.mark.parametrize("field", ["name", "version"])
@pytest.mark.parametrize("value", ["../x", "a/b", "..", "a\\b", ""])
def test_a_manifest_naming_a_path_is_refused(field: str, value: str) -> None:
    from pydantic import ValidationError

    fields = {
        "name": "allscore",
        "version": "v1",
        "created_at": "2026-11-26T00:00:00+00:00",
        "architecture": "tiny",
        "input_size": 32,
        "threshold": 0.5,
        "validation": ValidationMetrics(weighted_f1=1, auc=1, sensitivity=1, specificity=1, accuracy=1),
        "train_subjects": [],
        "val_subjects": [],
        "sha256": "0" * 64,
    }
    ModelManifest(**fields)  # the well-formed one loads
    with pytest.raises(ValidationError, match="no path separators"):
        ModelManifest(**{**fields, field: value})

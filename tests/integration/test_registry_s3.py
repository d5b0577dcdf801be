"""The registry on an S3 server over HTTP (moto server mode)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.artifact import Registry, load_model
from core.inference import predict_proba
from core.manifest import ModelIntegrityError, VersionExists
from core.storage import store_for
from tests.harness.artifacts import save_tiny_model, tiny_manifest

pytestmark = pytest.mark.integration


def test_publish_load_and_immutability_on_s3(tmp_path: Path, s3_bucket: str) -> None:
    registry = Registry(f"{s3_bucket}/models")
    path, model = save_tiny_model(tmp_path)
    assert registry.publish(path, tiny_manifest(path)) == "tiny:v1"
    other, _ = save_tiny_model(tmp_path, seed=3)
    with pytest.raises(VersionExists):
        registry.publish(other, tiny_manifest(other))
    registry.promote("tiny:v1", "production")
    loaded = load_model("tiny@production", store=registry.root)
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_proba(model, x, 8), predict_proba(loaded.model, x, 8))

    # A swapped object in the bucket is caught by the manifest's sha256 (the local cache is not trusted either).
    store_for(s3_bucket).upload(other, f"{registry.root}/tiny/v1/model.keras")
    cached = loaded.path
    cached.write_bytes(b"tampered")
    with pytest.raises(ModelIntegrityError):
        load_model("tiny:v1", store=registry.root)

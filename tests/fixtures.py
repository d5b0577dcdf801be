"""Session fixtures shared by the scoring tests: a small synthetic data set and a tiny published model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from core.manifest import ModelManifest


@dataclass(frozen=True)
class PublishedModel:
    """A tiny model trained on synthetic cells and published to a local store."""

    store: str
    ref: str
    manifest: ModelManifest
    data: Path


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic C-NMC-layout data set (6 subjects over 3 folds)."""
    from trainer.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, subjects=6, cells=40, seed=0)
    return out


def publish_tiny(factory: pytest.TempPathFactory, data: Path, name: str, stain_norm: str) -> PublishedModel:
    """A `tiny` 32x32 model trained for a few seconds on `data` and published to a local store of its own."""
    from trainer.train import TrainConfig, publish, train_model

    store = str(factory.mktemp(f"{name}-store") / "models")
    config = TrainConfig(
        name=name, arch="tiny", image_size=32, epochs=8, patience=8, seed=0, version="v1", stain_norm=stain_norm
    )
    manifest = publish(train_model(data, config, Console(stderr=True, quiet=True)), store)
    return PublishedModel(store=store, ref=manifest.ref, manifest=manifest, data=data)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> Iterator[PublishedModel]:
    """The tiny model, without stain normalisation: the scoring tests' oracles run model.keras on the pixels as
    read. The normalising path has its own model (stain_model) and tests."""
    yield publish_tiny(tmp_path_factory, synth_data, "tiny", "none")


@pytest.fixture(scope="session")
def stain_model(tmp_path_factory: pytest.TempPathFactory, synth_data: Path) -> PublishedModel:
    """The tiny model trained with per-sample stain normalisation (`--stain-norm sample`)."""
    return publish_tiny(tmp_path_factory, synth_data, "stain", "sample")

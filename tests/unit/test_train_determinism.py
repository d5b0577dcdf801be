"""`--seed` reproduces a training run: seeded generators and TensorFlow's deterministic ops give bit-identical
weights for the same seed on one machine, and another seed gives other weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console


def _weights(data: Path, seed: int) -> list[np.ndarray]:
    from trainer.train import TrainConfig, train_model

    config = TrainConfig(name="det", arch="tiny", image_size=32, epochs=2, patience=2, seed=seed, version="v1")
    outcome = train_model(data, config, Console(stderr=True, quiet=True))
    assert outcome.manifest.training["deterministic_ops"] is True
    return [np.asarray(w) for w in outcome.model.get_weights()]


def test_the_same_seed_gives_the_same_weights_and_another_seed_other_weights(synth_data: Path) -> None:
    first, again, other = _weights(synth_data, 3), _weights(synth_data, 3), _weights(synth_data, 4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))

"""Architectures: the three networks build, take uint8 images and return one probability per cell."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.arch import DEFAULT_SIZES, UnknownArchitecture, build_model


@pytest.mark.parametrize("arch", ["tiny", "seed", "carpenter"])
def test_each_architecture_maps_uint8_images_to_p_all(arch: str) -> None:
    size = 32 if arch == "tiny" else 64
    model = build_model(arch, size, seed=0)
    x = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    p = np.asarray(model(x, training=False))
    assert p.shape == (3, 1) and np.all((p >= 0) & (p <= 1))
    assert model.layers[1].name == "rescale"  # preprocessing lives inside the model
    assert model.layers[-1].dtype_policy.name == "float32"


def test_seed_is_three_blocks_of_three_convolutions_and_carpenter_two_of_two() -> None:
    from keras import layers

    seed = build_model("seed", 64)
    convs = [layer for layer in seed.layers if isinstance(layer, layers.Conv2D)]
    assert [c.filters for c in convs] == [32] * 3 + [64] * 3 + [128] * 3
    assert sum(isinstance(layer, layers.MaxPooling2D) for layer in seed.layers) == 3
    carpenter = build_model("carpenter")
    assert (
        carpenter.input_shape
        == (None, DEFAULT_SIZES["carpenter"], DEFAULT_SIZES["carpenter"], 3)
        == (None, 256, 256, 3)
    )
    assert [c.filters for c in carpenter.layers if isinstance(c, layers.Conv2D)] == [64] * 4


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(UnknownArchitecture, match="seed, carpenter, tiny"):
        build_model("resnet")

"""Model architectures. Rescaling lives inside the model so serving cannot preprocess differently."""

from __future__ import annotations

from typing import Any

from core.errors import AllscoreError

ARCHITECTURES = ("seed", "carpenter", "tiny")
DEFAULT_SIZES = {"seed": 64, "carpenter": 256, "tiny": 32}


class UnknownArchitecture(AllscoreError, ValueError):
    """An --arch that allscore does not build."""


def check_architecture(arch: str) -> None:
    """Raise UnknownArchitecture, naming the choices, unless allscore builds `arch`."""
    if arch not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_model(arch: str, image_size: int | None = None, *, seed: int = 0) -> Any:
    """A compiled-free Keras model taking uint8 RGB (S, S, 3) and returning sigmoid p(all)."""
    import keras
    from keras import layers

    check_architecture(arch)
    size = image_size or DEFAULT_SIZES[arch]
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(size, size, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    if arch == "tiny":
        x = layers.Conv2D(8, 3, activation="relu", padding="same")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Conv2D(16, 3, activation="relu", padding="same")(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(16, activation="relu")(x)
    elif arch == "seed":
        # The write-up's final network: three blocks of three 3x3 convolutions, max-pooling between.
        for i, filters in enumerate((32, 64, 128)):
            for j in range(3):
                # Batch normalisation keeps this 9-layer stack from stalling at p = 0.5 on dark, sparse cells
                # (seen in two of four runs without it); momentum 0.9 so the moving statistics settle within the few
                # hundred steps a small data set gives (0.99 left inference-mode outputs near-constant).
                x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"b{i}c{j}")(x)
                x = layers.BatchNormalization(momentum=0.9, name=f"b{i}n{j}")(x)
                x = layers.ReLU(name=f"b{i}r{j}")(x)
            x = layers.MaxPooling2D(name=f"pool{i}")(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(64, activation="relu")(x)
        x = layers.Dropout(0.3)(x)
    else:  # carpenter: the original repository's best network
        for i in range(2):
            x = layers.Conv2D(64, 3, activation="relu", name=f"b{i}c0")(x)
            x = layers.Conv2D(64, 3, activation="relu", name=f"b{i}c1")(x)
            x = layers.MaxPooling2D(name=f"pool{i}")(x)
            x = layers.Dropout(0.25)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(128, activation="relu")(x)
        x = layers.Dropout(0.25)(x)
    # float32 output even under a mixed-precision policy, so probabilities are not rounded.
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="p_all")(x)
    return keras.Model(inputs, outputs, name=f"allscore_{arch}")

"""Batched inference shared by evaluation and scoring: fixed-size batches, `model(x, training=False)`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def configure_tensorflow(threads: int) -> None:
    """Set TensorFlow's thread pools before the first op of this process."""
    # Must run before TensorFlow creates its thread pools, i.e. before the first op.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError:
            log.warning("TensorFlow was already initialised; thread counts left as they are")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16 or AMX); elsewhere bf16 is slower, not faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def with_precision(model: Any, precision: str) -> Any:
    """The same model computing in `precision`: float32 as loaded, or mixed bfloat16 (float32 output layer)."""
    if precision != "bfloat16":
        return model
    if not cpu_has_bf16():
        log.warning("ALLSCORE_PRECISION=bfloat16 but this CPU lacks AVX512_BF16/AMX: scoring in float32")
        return model
    import keras

    config = model.get_config()
    outputs = config.get("output_layers", [])
    # One output is stored as ["name", 0, 0], several as a list of those.
    output_names = {outputs[0]} if outputs and isinstance(outputs[0], str) else {ref[0] for ref in outputs}
    for layer in config["layers"]:
        # Inputs keep their dtype; the output layer stays float32 so probabilities are not rounded.
        if layer["class_name"] == "InputLayer" or layer["config"].get("name") in output_names:
            continue
        layer["config"]["dtype"] = {
            "module": "keras",
            "class_name": "DTypePolicy",
            "config": {"name": "mixed_bfloat16"},
            "registered_name": None,
        }
    converted = keras.Model.from_config(config)
    converted.set_weights(model.get_weights())
    return converted


def padded_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (batch, n_real) with the last batch padded to batch_size, so the model never retraces."""
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:
            pad = np.zeros((batch_size - n, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        yield chunk, n


def predict_batch(model: Any, batch: np.ndarray) -> np.ndarray:
    """p(all) for one batch of uint8 images, as float64, via a direct call (not `predict`)."""
    out = model(batch, training=False)
    return np.asarray(out, dtype=np.float64).reshape(len(batch), -1)[:, -1]


def predict_proba(model: Any, images: np.ndarray | Iterable[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """p(all) for every image, in fixed-size batches."""
    images = np.asarray(images)
    if len(images) == 0:
        return np.zeros(0, dtype=np.float64)
    parts = [predict_batch(model, batch)[:n] for batch, n in padded_batches(images, batch_size)]
    return np.concatenate(parts)

"""Batched inference shared by evaluation and scoring: fixed-size batches, `model(x, training=False)`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def configure_tensorflow(threads: int, precision: str = "float32") -> None:
    """Set TensorFlow's thread pools and Keras precision before the first op of this process."""
    # Must run before TensorFlow creates its thread pools, i.e. before the first op.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    if threads > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError:
            log.warning("TensorFlow was already initialised; thread counts left as they are")
    if precision == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")


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

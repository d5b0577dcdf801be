"""Batched inference shared by evaluation and scoring: fixed-size batches, `model(x, training=False)`."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.logs import quiet_native_stderr

log = logging.getLogger(__name__)


def import_tensorflow() -> Any:
    """Import TensorFlow and let it probe its devices without its native start-up lines (CUDA probing, oneDNN and
    CPU-feature notes) reaching the log; TF_CPP_MIN_LOG_LEVEL=0 keeps them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_stderr(enabled=os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"):
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def configure_tensorflow(threads: int) -> None:
    """Set TensorFlow's thread pools before the first op of this process."""
    # Must run before TensorFlow creates its thread pools, i.e. before the first op.
    tf = import_tensorflow()
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


def _usable_precision(precision: str) -> str:
    """`precision`, except bfloat16 on a CPU without it, which falls back to float32 with a warning."""
    if precision == "bfloat16" and not cpu_has_bf16():
        log.warning("ALLSCORE_PRECISION=bfloat16 but this CPU lacks AVX512_BF16/AMX: scoring in float32")
        return "float32"
    return precision


def _is_chain(model: Any) -> bool:
    """Whether every layer feeds only the next one (all allscore architectures are chains)."""
    config = model.get_config()
    layers = config.get("layers", [])
    for previous, layer in itertools.pairwise(layers):
        nodes = layer.get("inbound_nodes") or []
        if len(nodes) != 1 or len(nodes[0].get("args", [])) != 1:
            return False
        arg = nodes[0]["args"][0]
        history = arg.get("config", {}).get("keras_history") if isinstance(arg, dict) else None
        if not history or history[0] != previous["name"]:
            return False
    return len(model.inputs) == 1 and len(model.outputs) == 1


def _folded_conv(conv: Any, bn: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
    """A Conv2D config and weights equal, in inference, to conv followed by batch normalisation."""
    weights = conv.get_weights()
    kernel = weights[0].astype(np.float64)
    bias = weights[1].astype(np.float64) if conv.use_bias else np.zeros(kernel.shape[-1])
    params = dict(zip(("gamma", "beta", "moving_mean", "moving_variance"), [None] * 4, strict=True))
    values = iter(bn.get_weights())
    for name, present in (("gamma", bn.scale), ("beta", bn.center), ("moving_mean", True), ("moving_variance", True)):
        params[name] = next(values).astype(np.float64) if present else None
    gamma = params["gamma"] if params["gamma"] is not None else 1.0
    beta = params["beta"] if params["beta"] is not None else 0.0
    scale = gamma / np.sqrt(params["moving_variance"] + bn.epsilon)
    config = conv.get_config()
    config["use_bias"] = True
    folded = [(kernel * scale).astype(np.float32), ((bias - params["moving_mean"]) * scale + beta).astype(np.float32)]
    return config, folded


def prepare_for_serving(model: Any, precision: str = "float32") -> Any:
    """The model as a worker runs it: batch normalisation folded into the convolutions, in `precision`.

    Folding removes a pass over every activation map per convolution, and keeps the small variances of
    batch normalisation out of bfloat16. Under bfloat16 (only where the CPU has it) every layer but the
    float32 output computes in bfloat16. A model that is not a simple chain of layers is returned as it is
    (apart from precision, which then applies through with_precision).
    """
    import keras
    from keras import layers as kl

    precision = _usable_precision(precision)
    if not _is_chain(model):
        return with_precision(model, precision)
    policy = "mixed_bfloat16" if precision == "bfloat16" else "float32"
    source = model.layers
    x = inputs = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name="image")
    i = 1
    while i < len(source):
        layer = source[i]
        following = source[i + 1] if i + 1 < len(source) else None
        is_output = i == len(source) - 1
        if isinstance(layer, kl.Conv2D) and isinstance(following, kl.BatchNormalization):
            config, weights = _folded_conv(layer, following)
            step = 2
        elif isinstance(layer, kl.Dropout):
            i += 1  # identity at inference
            continue
        else:
            config, weights, step = layer.get_config(), layer.get_weights(), 1
        if not is_output:
            config["dtype"] = policy
        rebuilt = layer.__class__.from_config(config)
        x = rebuilt(x)
        rebuilt.set_weights(weights)
        i += step
    return keras.Model(inputs, x, name=f"{model.name}_serving")


def with_precision(model: Any, precision: str) -> Any:
    """The same model computing in `precision`: float32 as loaded, or mixed bfloat16 (float32 output layer)."""
    if _usable_precision(precision) != "bfloat16":
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


class ServingModel:
    """A Keras model as the worker runs it: prepared for serving and called through one traced graph.

    Calling the Keras model eagerly runs op by op; one tf.function over the fixed batch shape lets
    TensorFlow fuse convolution, bias and ReLU (measured +20-35% cells/s here). The batch shape never
    changes (the last batch is padded), so the graph is traced once. One of the runtimes of core/runtimes.py.
    """

    runtime = "tensorflow"

    def __init__(self, model: Any, precision: str = "float32") -> None:
        import tensorflow as tf

        self.keras_model = prepare_for_serving(model, precision)
        self.precision = (
            precision
            if any("bfloat16" in str(getattr(layer, "dtype_policy", "")) for layer in self.keras_model.layers)
            else "float32"
        )
        self._call = tf.function(lambda x: self.keras_model(x, training=False), reduce_retracing=True)

    def __call__(self, x: Any, training: bool = False) -> Any:
        """p(all) for a batch; `training` must stay False."""
        if training:
            raise ValueError("ServingModel is for inference only")
        return self._call(x)


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

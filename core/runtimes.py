"""The runtimes that run a published model's forward pass, behind one interface.

A runtime model is called like a Keras model, `model(batch, training=False)`, on a fixed-size uint8 batch
(N, S, S, 3) and returns p(all) as (N, 1); it says which runtime and precision it computes in (`runtime`,
`precision`). Two runtimes:

- `tensorflow`: `core.inference.ServingModel` on model.keras (batch norm folded, one traced graph; bfloat16 where the
  CPU has it).
- `onnxruntime`: `OnnxServingModel` on the version's model.onnx (exported at publish by trainer/export.py and checked
  against model.keras there). This module never imports TensorFlow for it: a worker on ONNX Runtime does not
  carry TensorFlow in its processes, and refuses a version without the export (`core.manifest.ExportMissing`).

`ALLSCORE_RUNTIME` picks one (`choose_runtime`): `tensorflow`, `onnxruntime`, or `auto` (ONNX Runtime where it is
installed and the version has the export, unless bfloat16 is asked for on a CPU that computes it natively, where
TensorFlow's bfloat16 path is the one that uses those instructions).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.inference import cpu_has_bf16

log = logging.getLogger(__name__)

RUNTIMES = ("tensorflow", "onnxruntime")


class RuntimeModel(Protocol):
    """What the engine calls: a fixed-size uint8 batch in, p(all) (N, 1) out."""

    runtime: str
    precision: str

    def __call__(self, x: Any, training: bool = False) -> Any: ...


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime is installed (allscore[onnx])."""
    return importlib.util.find_spec("onnxruntime") is not None


def tensorflow_imported() -> bool:
    """Whether this process has imported TensorFlow (Keras imports it too)."""
    return "tensorflow" in sys.modules


def choose_runtime(setting: str, has_export: bool, precision: str = "float32") -> str:
    """The runtime that serves a version: the one named, or for `auto` ONNX Runtime when it is installed and the
    version has an ONNX export (and bfloat16 was not asked for on a CPU that computes it), else TensorFlow."""
    if setting in RUNTIMES:
        return setting
    if setting != "auto":
        raise ValueError(f"unknown runtime {setting!r}; choose tensorflow, onnxruntime or auto")
    if precision == "int8":
        return "onnxruntime"  # only ONNX Runtime serves int8; a version without the export is refused with advice
    if precision == "bfloat16" and cpu_has_bf16():
        return "tensorflow"
    return "onnxruntime" if has_export and onnxruntime_available() else "tensorflow"


class OnnxServingModel:
    """A model.onnx run by ONNX Runtime, called like the TensorFlow ServingModel.

    The session runs with `threads` intra-op threads (0: ONNX Runtime's default, one per core) and one inter-op
    thread, all graph optimisations on, and the intra-op threads not spinning between runs by default: in a worker
    they share the cores with the fetch/decode threads, which a spinning pool would starve. CUDA is used when ONNX
    Runtime has its CUDA provider (onnxruntime-gpu) and a GPU answers; the CPU otherwise.
    """

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int = 0, precision: str = "float32", *, spin: bool = False) -> None:
        import onnxruntime as ort

        if precision not in ("float32", "int8"):
            log.warning(
                "ALLSCORE_PRECISION=%s: ONNX Runtime serves float32 or int8 exports; scoring in float32", precision
            )
            precision = "float32"
        self.precision = precision  # what the file holds: model.onnx float32, model-int8.onnx int8
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = self.session.get_providers()
        (first,) = self.session.get_inputs()
        self.input_name = first.name
        self.input_shape = tuple(first.shape)
        self.path = path

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        """p(all) for a batch of uint8 images; `training` must stay False."""
        if training:
            raise ValueError("OnnxServingModel is for inference only")
        batch = np.ascontiguousarray(x, dtype=np.uint8)
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])


def load_runtime_model(runtime: str, path: Path, precision: str = "float32", threads: int = 0) -> RuntimeModel:
    """A runtime model from a local file: model.keras for tensorflow (loaded in Keras safe mode), model.onnx for
    onnxruntime. TensorFlow must already be configured (core.inference.configure_tensorflow) for the former."""
    if runtime == "onnxruntime":
        return OnnxServingModel(path, threads, precision)
    if runtime != "tensorflow":
        raise ValueError(f"unknown runtime {runtime!r}; choose tensorflow or onnxruntime")
    from core.artifact import load_keras
    from core.inference import ServingModel

    return ServingModel(load_keras(path), precision)

"""The runtimes that run a published model's forward pass, behind one interface.

A runtime model is called like a Keras model, `model(batch, training=False)`, on a fixed-size uint8 batch
(N, S, S, 3) and returns p(all) as (N, 1); it says which runtime and precision it computes in (`runtime`,
`precision`). Two runtimes:

- `tensorflow`: `core.inference.ServingModel` on model.keras (batch norm folded, one traced graph; bfloat16 where the
  CPU has it).
- `onnxruntime`: `OnnxServingModel` on the version's model.onnx (exported at publish by trainer/export.py and checked
  against model.keras there). This module never imports TensorFlow for it: a worker on ONNX Runtime does not
  carry TensorFlow in its processes, and refuses a version without the export (`core.manifest.ExportMissing`).
- `openvino`: `OpenVinoServingModel` on the same ONNX files (model.onnx, model-int8.onnx), read by OpenVINO's CPU
  plugin (allscore[openvino]); float32, bfloat16 where the CPU computes it, or the gated int8 export. No TensorFlow
  either.

`ALLSCORE_RUNTIME` and `ALLSCORE_PRECISION` pick one (`choose_serving`); both default to `auto`: the fastest
combination measured that holds accuracy, given the CPU, what is installed and the version's exports (the int8
export, else bfloat16 on a CPU that has it, else the ONNX export in float32, else TensorFlow float32; OpenVINO before
the others where it is installed, ONNX Runtime for float32).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.inference import cpu_has_bf16

log = logging.getLogger(__name__)

RUNTIMES = ("tensorflow", "onnxruntime", "openvino")
ONNX_RUNTIMES = ("onnxruntime", "openvino")  # the runtimes that read the ONNX exports


class RuntimeModel(Protocol):
    """What the engine calls: a fixed-size uint8 batch in, p(all) (N, 1) out."""

    runtime: str
    precision: str

    def __call__(self, x: Any, training: bool = False) -> Any: ...


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime is installed (allscore[onnx])."""
    return importlib.util.find_spec("onnxruntime") is not None


def openvino_available() -> bool:
    """Whether OpenVINO is installed (allscore[openvino])."""
    return importlib.util.find_spec("openvino") is not None


def tensorflow_imported() -> bool:
    """Whether this process has imported TensorFlow (Keras imports it too)."""
    return "tensorflow" in sys.modules


def choose_runtime(setting: str, has_export: bool, precision: str = "float32") -> str:
    """The runtime that serves a version at an explicit precision: the one named, or for `auto` the one auto's order
    (choose_serving) gives that precision: int8 by OpenVINO where installed, else ONNX Runtime; bfloat16 on a CPU
    that computes it by OpenVINO on the ONNX export where both are there, else TensorFlow; otherwise ONNX Runtime
    when it is installed and the version has an ONNX export, else TensorFlow."""
    if setting in RUNTIMES:
        return setting
    if setting != "auto":
        raise ValueError(f"unknown runtime {setting!r}; choose tensorflow, onnxruntime, openvino or auto")
    if precision == "int8":  # TensorFlow does not serve int8; a version without the export is refused with advice
        return "openvino" if openvino_available() else "onnxruntime"
    if precision == "bfloat16" and cpu_has_bf16():
        return "openvino" if has_export and openvino_available() else "tensorflow"
    return "onnxruntime" if has_export and onnxruntime_available() else "tensorflow"


@dataclass(frozen=True)
class Serving:
    """How a version is served: the runtime, the precision, the file (`export`: a key of the manifest's exports, or
    None for model.keras) and why that one."""

    runtime: str
    precision: str
    export: str | None
    why: str


def tensorflow_available() -> bool:
    """Whether TensorFlow is installed (not in the worker-onnx image)."""
    return importlib.util.find_spec("tensorflow") is not None


def choose_serving(
    runtime: str,
    precision: str,
    exports: Collection[str],
    *,
    bf16: bool | None = None,
    have_tensorflow: bool | None = None,
    have_onnxruntime: bool | None = None,
    have_openvino: bool | None = None,
) -> Serving:
    """The runtime and precision that serve a version with these exports, from ALLSCORE_RUNTIME and
    ALLSCORE_PRECISION. An explicit precision is served as asked (choose_runtime). `auto`, the default, takes the
    first of these that the CPU, the install and the version allow; the order is that of the speeds measured
    (bench/README.md, "Runtimes"), each holding weighted F1 within 0.01 of float32:

    1. int8, where the version has an int8 export (it exists only if it passed its accuracy gate): OpenVINO where
       it is installed, else ONNX Runtime;
    2. bfloat16, where the CPU computes it (AVX512_BF16 or AMX): OpenVINO on the ONNX export where it is installed,
       else TensorFlow;
    3. ONNX Runtime float32, where the version has the export (also a fraction of TensorFlow's memory);
    4. TensorFlow float32.
    """
    bf16 = cpu_has_bf16() if bf16 is None else bf16
    have_tf = tensorflow_available() if have_tensorflow is None else have_tensorflow
    have_ort = onnxruntime_available() if have_onnxruntime is None else have_onnxruntime
    have_ov = openvino_available() if have_openvino is None else have_openvino
    if precision != "auto":
        chosen = choose_runtime(runtime, "onnx" in exports, precision)
        export = "onnx-int8" if precision == "int8" else ("onnx" if chosen in ONNX_RUNTIMES else None)
        return Serving(chosen, precision, export, f"ALLSCORE_PRECISION={precision}")
    if runtime not in (*RUNTIMES, "auto"):
        raise ValueError(f"unknown runtime {runtime!r}; choose tensorflow, onnxruntime, openvino or auto")
    ov_ok = runtime in ("auto", "openvino") and have_ov
    ort_ok = runtime in ("auto", "onnxruntime") and have_ort
    if "onnx-int8" in exports and (ov_ok or ort_ok):
        return Serving("openvino" if ov_ok else "onnxruntime", "int8", "onnx-int8", "the version's gated int8 export")
    if bf16 and ov_ok and "onnx" in exports:
        return Serving("openvino", "bfloat16", "onnx", "this CPU computes bfloat16 (AVX512_BF16/AMX)")
    if runtime in ("auto", "tensorflow") and have_tf and bf16:
        return Serving("tensorflow", "bfloat16", None, "this CPU computes bfloat16 (AVX512_BF16/AMX)")
    if ort_ok and "onnx" in exports:
        return Serving("onnxruntime", "float32", "onnx", "the version's ONNX export")
    if ov_ok and "onnx" in exports:
        return Serving("openvino", "float32", "onnx", "the version's ONNX export")
    if runtime in ONNX_RUNTIMES or (runtime == "auto" and not have_tf):
        # No TensorFlow to fall back on: fetching "onnx" refuses the version with the command that makes it.
        name = runtime if runtime in ONNX_RUNTIMES else ("openvino" if have_ov and not have_ort else "onnxruntime")
        return Serving(name, "float32", "onnx", "no TensorFlow here")
    return Serving("tensorflow", "float32", None, "no export, no bfloat16 on this CPU")


def tensorflow_precision(precision: str) -> str:
    """What TensorFlow computes in for ALLSCORE_PRECISION (`allscore evaluate`): `auto` is bfloat16 where the CPU
    computes it, float32 elsewhere; int8 is the ONNX runtimes', so float32 here."""
    if precision == "auto":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return "float32" if precision == "int8" else precision


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
        # No memory pattern: ONNX Runtime otherwise keeps one block planned for a whole run's activations. Off, the
        # same speed at 0.55-0.75 of the memory (bench/README.md, "Runtimes", worker memory).
        options.enable_mem_pattern = False
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


class _StackT(ctypes.Structure):
    """struct stack_t (sigaltstack(2))."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def _keeping_sigaltstack() -> Iterator[None]:
    """Give the calling thread back its own alternate signal stack after the block.

    OpenVINO's compile_model (2026.4) leaves the thread's alternate signal stack pointing into memory that belongs to
    what it compiled; once that is freed, the next signal handled on it crashes the process. Python installs its
    handlers to run on that stack (SA_ONSTACK), and Celery's soft time limit is SIGUSR1: a worker would die on its
    first soft limit after a model was replaced (tests/unit/test_runtimes.py has the crash).
    """
    libc, saved = None, _StackT()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
            libc = None
    except (OSError, AttributeError):  # not Linux or no sigaltstack: nothing to keep
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.sigaltstack(ctypes.byref(saved), None)


class OpenVinoServingModel:
    """A model.onnx (or model-int8.onnx) run by OpenVINO's CPU plugin, called like the TensorFlow ServingModel.

    OpenVINO reads the ONNX file itself (no IR is written). It compiles the model for each batch size it is called
    with (the engine uses one), one stream of `threads` threads (0: one per core), threads not pinned to cores (in a
    worker they share the cores with the fetch/decode threads). Precision: float32; bfloat16 (OpenVINO's inference
    precision hint, on CPUs with AVX512_BF16 or AMX; float32 elsewhere); int8: the gated int8 export, whose int8
    layers run as int8 and whose float layers (the stem, where kept) run in bfloat16 where the CPU computes it.
    """

    runtime = "openvino"

    def __init__(self, path: Path, threads: int = 0, precision: str = "float32") -> None:
        import openvino

        if precision not in ("float32", "bfloat16", "int8"):
            log.warning(
                "ALLSCORE_PRECISION=%s: OpenVINO serves float32, bfloat16 or int8; scoring in float32", precision
            )
            precision = "float32"
        if precision == "bfloat16" and not cpu_has_bf16():
            log.warning("ALLSCORE_PRECISION=bfloat16: this CPU does not compute bfloat16; scoring in float32")
            precision = "float32"
        self.precision = precision
        self.core = openvino.Core()
        self.model = self.core.read_model(str(path))
        (first,) = self.model.inputs
        self.input_name = first.any_name
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in first.partial_shape)
        hint = "bf16" if precision == "bfloat16" or (precision == "int8" and cpu_has_bf16()) else "f32"
        self.config = {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "ENABLE_CPU_PINNING": False,
        }
        if threads > 0:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.path = path

    def _request(self, n: int) -> Any:
        """The infer request for batches of n, compiling the model for that shape the first time."""
        request = self._compiled.get(n)
        if request is None:
            model = self.model.clone()
            model.reshape({self.input_name: [n, *self.input_shape[1:]]})
            with _keeping_sigaltstack():
                request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            self._compiled[n] = request
        return request

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        """p(all) for a batch of uint8 images; `training` must stay False."""
        if training:
            raise ValueError("OpenVinoServingModel is for inference only")
        batch = np.ascontiguousarray(x, dtype=np.uint8)
        with self._lock:
            result = self._request(len(batch)).infer({0: batch})
            return np.array(result[0]).reshape(len(batch), 1)


def load_runtime_model(runtime: str, path: Path, precision: str = "float32", threads: int = 0) -> RuntimeModel:
    """A runtime model from a local file: model.keras for tensorflow (loaded in Keras safe mode), an ONNX export for
    onnxruntime and openvino. TensorFlow must already be configured (core.inference.configure_tensorflow) for the
    former."""
    if runtime == "onnxruntime":
        return OnnxServingModel(path, threads, precision)
    if runtime == "openvino":
        return OpenVinoServingModel(path, threads, precision)
    if runtime != "tensorflow":
        raise ValueError(f"unknown runtime {runtime!r}; choose tensorflow, onnxruntime or openvino")
    from core.artifact import load_keras
    from core.inference import ServingModel

    return ServingModel(load_keras(path), precision)

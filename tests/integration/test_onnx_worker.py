"""A real worker on ONNX Runtime or OpenVINO (ALLSCORE_RUNTIME=onnxruntime|openvino) over Redis, PostgreSQL and S3:
it scores a sample like TensorFlow does without TensorFlow in its processes, and refuses a version without an ONNX
export."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from core.artifact import Registry, load_keras
from core.imaging import decode_image
from core.runtimes import OnnxServingModel
from core.settings import reset_settings_cache
from core.storage import store_for
from tests.integration.stack import Stack
from trainer.export import EXPORT_TOLERANCE

pytestmark = pytest.mark.integration


def _tensorflow_libraries(maps: str) -> list[str]:
    """The files of TensorFlow itself mapped into a process (/proc/PID/maps)."""
    return [line for line in maps.splitlines() if "/site-packages/tensorflow/" in line or "libtensorflow" in line]


def _store_with_and_without_export(stack: Stack, name: str = "onnx-store") -> tuple[str, str, str]:
    """A store holding the tiny model as published (with model.onnx) and the same model.keras as a version
    published before exports existed; returns (store, ref with export, ref without)."""
    source = Registry(stack.model.store)
    keras_file, manifest = source.fetch(stack.model.ref)
    onnx_file, _ = source.fetch_export(stack.model.ref)
    store = str(stack.tmp / name)
    registry = Registry(store)
    registry.publish(keras_file, manifest, exports={"onnx": onnx_file})
    legacy = manifest.model_copy(update={"version": "noexport", "exports": {}})
    registry.publish(keras_file, legacy)
    return store, manifest.ref, legacy.ref


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_worker_on_an_onnx_runtime_scores_without_tensorflow(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, runtime: str
) -> None:
    store, ref, legacy = _store_with_and_without_export(stack, f"{runtime}-store")
    monkeypatch.setenv("ALLSCORE_MODEL_STORE", store)
    reset_settings_cache()
    sample = f"{runtime}-slide"
    prefix = stack.upload_sample(sample, 20, fraction=0.5, seed=3)
    worker = stack.start_worker(
        concurrency=1, ALLSCORE_MODEL_STORE=store, ALLSCORE_RUNTIME=runtime, ALLSCORE_PRECISION="float32"
    )

    job = stack.submit({sample: [prefix]}, model_ref=ref)
    row = stack.wait_final(job, 1, 120)[sample]
    assert (row["status"], row["n_cells"], row["n_failed"]) == ("done", 20, 0), row

    # What the operator reads in the worker's log: the runtime, and that TensorFlow is not in the process ...
    (line,) = [ln for ln in worker.log().splitlines() if f"model loaded: {ref}" in ln]
    assert f"runtime {runtime}, float32 (tensorflow not imported in this process)" in line, line
    pid = int(re.search(r"in pid (\d+)", line).group(1))  # type: ignore[union-attr]
    # ... and what the kernel says of that pool process: no TensorFlow library mapped (OpenVINO maps its own
    # converter from TensorFlow's format, libopenvino_tensorflow_frontend, at import: not TensorFlow).
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert runtime in maps and not _tensorflow_libraries(maps)

    # The probabilities are the model's: model.keras's within the export's tolerance, whichever runtime ran it.
    cells = stack.query("SELECT image_uri, p_all FROM cell_results WHERE sample_id = :s ORDER BY 1", s=sample)
    bucket = store_for(stack.bucket)
    size = stack.model.manifest.input_size
    x = np.stack([decode_image(bucket.read_bytes(c["image_uri"]), size) for c in cells])
    written = np.array([c["p_all"] for c in cells])
    registry = Registry(store)
    onnx = np.asarray(OnnxServingModel(registry.fetch_export(ref)[0])(x)).reshape(-1)
    keras = np.asarray(load_keras(registry.fetch(ref)[0])(x, training=False)).reshape(-1)
    np.testing.assert_allclose(written, onnx, atol=1e-6 if runtime == "onnxruntime" else EXPORT_TOLERANCE)
    np.testing.assert_allclose(written, keras, atol=EXPORT_TOLERANCE)

    # A version without the export is refused: the sample fails with the command that makes one.
    job = stack.submit({f"legacy-{sample}": [prefix]}, model_ref=legacy)
    row = stack.wait_final(job, 1, 60)[f"legacy-{sample}"]
    assert row["status"] == "failed"
    assert f"allscore models export {legacy}" in row["error"], row["error"]
    assert not _tensorflow_libraries(Path(f"/proc/{pid}/maps").read_text())

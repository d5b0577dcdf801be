"""Serving runtimes: the ONNX export matches TensorFlow, is published with its sha256, and serves without TensorFlow.

Tolerance: ONNX Runtime's p(all) must be within trainer.export.EXPORT_TOLERANCE (1e-4) of TensorFlow's, on real
C-NMC cells and on synthetic ones; both compute in float32, with different kernels and summation orders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from core.artifact import Registry
from core.imaging import load_image
from core.inference import ServingModel, cpu_has_bf16, predict_proba
from core.manifest import (
    ExportMissing,
    ModelError,
    ModelManifest,
    ServingExport,
    ValidationMetrics,
    VersionExists,
    sha256_file,
)
from core.runtimes import (
    OnnxServingModel,
    OpenVinoServingModel,
    choose_runtime,
    load_runtime_model,
    onnxruntime_available,
    openvino_available,
)
from tests.fixtures import PublishedModel
from tests.harness.artifacts import seed_model_with_batch_norm
from tests.helpers import REPO_ROOT, cnmc_cells
from trainer.arch import build_model
from trainer.export import (
    EXPORT_TOLERANCE,
    converter_available,
    make_onnx_export,
    max_difference,
    synthetic_check_cells,
)

pytestmark = pytest.mark.skipif(not converter_available(), reason="allscore[onnx] not installed")

SIZE = 32


@pytest.fixture(scope="module")
def seed_model():
    """A seed network with non-trivial batch-norm statistics (outputs that vary between cells)."""
    model = seed_model_with_batch_norm(SIZE)
    # Centre and widen the output's logits, so that p(all) spreads over (0, 1) instead of sitting near 0.
    cells = np.concatenate([synthetic_check_cells(SIZE, n=16, seed=11), _real_cells()])
    p = np.clip(predict_proba(model, cells, 8), 1e-6, 1 - 1e-6)
    logits = np.log(p / (1 - p))
    out = model.get_layer("p_all")
    kernel, bias = out.get_weights()
    gain = 2.0 / max(float(logits.std()), 1e-3)
    out.set_weights([kernel * gain, (bias - logits.mean()) * gain])
    return model


def _real_cells() -> np.ndarray:
    return np.stack([load_image(path, SIZE) for path in cnmc_cells()])


def test_onnx_runtime_matches_tensorflow_on_real_and_synthetic_cells(seed_model, tmp_path: Path) -> None:
    real, synthetic = _real_cells(), synthetic_check_cells(SIZE, n=24, seed=3)
    path, record = make_onnx_export(seed_model, tmp_path, synthetic, "24 synthetic cells")
    assert path.name == "model.onnx" and record.sha256 == sha256_file(path)
    assert record.max_abs_diff <= EXPORT_TOLERANCE == record.tolerance
    onnx = OnnxServingModel(path, threads=1)
    assert onnx.runtime == "onnxruntime" and onnx.precision == "float32"
    tensorflow = ServingModel(seed_model)
    for cells in (real, synthetic):
        expected = predict_proba(seed_model, cells, 8)
        assert expected.std() > 0.01  # the comparison means something only if the outputs vary
        # batch 8 with a padded last batch, as the engine calls it
        np.testing.assert_allclose(predict_proba(onnx, cells, 8), expected, atol=EXPORT_TOLERANCE)
        np.testing.assert_allclose(predict_proba(onnx, cells, 8), predict_proba(tensorflow, cells, 8), atol=1e-4)


def test_openvino_matches_tensorflow_on_real_and_synthetic_cells(seed_model, tmp_path: Path) -> None:
    # OpenVINO reads the same model.onnx: float32 within the export's tolerance of TensorFlow's; bfloat16, where the
    # CPU computes it, about as far from float32 as TensorFlow's own bfloat16 (this random network with inflated
    # batch-norm gains and widened logits amplifies rounding: both move p(all) by 0.04-0.1 on average here, where
    # trained models move by under 0.01).
    real, synthetic = _real_cells(), synthetic_check_cells(SIZE, n=24, seed=3)
    path, _ = make_onnx_export(seed_model, tmp_path, synthetic, "24 synthetic cells")
    float32 = OpenVinoServingModel(path, threads=1)
    assert (float32.runtime, float32.precision) == ("openvino", "float32")
    for cells in (real, synthetic):
        expected = predict_proba(seed_model, cells, 8)
        assert expected.std() > 0.01
        np.testing.assert_allclose(predict_proba(float32, cells, 8), expected, atol=EXPORT_TOLERANCE)
        # a batch size it has not seen is compiled for, not refused
        np.testing.assert_allclose(predict_proba(float32, cells, 5), expected, atol=EXPORT_TOLERANCE)
    bf16 = OpenVinoServingModel(path, precision="bfloat16")
    if not cpu_has_bf16():
        assert bf16.precision == "float32"  # served in float32 on a CPU without bfloat16, and says so
        return
    assert bf16.precision == "bfloat16"
    cells = np.concatenate([real, synthetic])
    expected = predict_proba(seed_model, cells, 8)
    openvino = np.abs(predict_proba(bf16, cells, 8) - expected).mean()
    tensorflow = np.abs(predict_proba(ServingModel(seed_model, "bfloat16"), cells, 8) - expected).mean()
    assert 0 < openvino <= 1.5 * tensorflow + 0.005, (openvino, tensorflow)


def test_openvino_leaves_the_threads_signal_stack_as_it_was(seed_model, tmp_path: Path) -> None:
    # OpenVINO's compile points the calling thread's alternate signal stack into memory its compiled model owns.
    # Python runs signal handlers on that stack (SA_ONSTACK), so once the model was freed the next signal (Celery's
    # soft time limit is SIGUSR1) crashed the process with SIGSEGV: seen in this suite, and in a script that freed
    # two 64x64 models. core.runtimes gives the thread its own stack back after each compile.
    import ctypes

    class Stack(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    def current() -> tuple:
        stack = Stack()
        assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.ss_sp, stack.ss_flags, stack.ss_size

    path, _ = make_onnx_export(seed_model, tmp_path, synthetic_check_cells(SIZE, n=8), "8 synthetic cells")
    before = current()
    model = OpenVinoServingModel(path)
    for n in (8, 5):  # a compile per batch size
        model(np.zeros((n, SIZE, SIZE, 3), np.uint8))
        assert current() == before


def test_an_export_of_another_model_is_refused(seed_model, tmp_path: Path) -> None:
    cells = synthetic_check_cells(SIZE, n=16)
    other = build_model("seed", SIZE, seed=2)
    path, record = make_onnx_export(other, tmp_path, cells, "16 synthetic cells")
    assert max_difference(seed_model, path, cells) > EXPORT_TOLERANCE
    # A record that failed its check is never published.
    model_file = tmp_path / "m.keras"
    seed_model.save(model_file)
    failed = record.model_copy(update={"max_abs_diff": 0.2})
    manifest = _manifest(model_file, "bad").model_copy(update={"exports": {"onnx": failed}})
    with pytest.raises(ModelError, match=r"differs from model\.keras"):
        Registry(str(tmp_path / "store")).publish(model_file, manifest, exports={"onnx": path})


def test_publishing_writes_model_onnx_with_its_sha256(tiny_model: PublishedModel) -> None:
    registry = Registry(tiny_model.store)
    manifest = registry.resolve(tiny_model.ref)
    record = manifest.exports["onnx"]
    stored = Path(tiny_model.store) / "tiny" / "v1" / "model.onnx"
    assert stored.exists() and sha256_file(stored) == record.sha256
    assert json.loads((stored.parent / "manifest.json").read_text())["exports"]["onnx"]["sha256"] == record.sha256
    assert record.max_abs_diff <= record.tolerance and "validation cells" in record.checked_on
    assert record.n_checked > 0 and record.converter.startswith("tf2onnx")
    path, _ = registry.fetch_export(tiny_model.ref)
    assert sha256_file(path) == record.sha256
    with pytest.raises(VersionExists):
        registry.publish_export(tiny_model.ref, "onnx", path, record)


def _manifest(path: Path, version: str) -> ModelManifest:
    return ModelManifest(
        name="legacy",
        version=version,
        created_at="2026-01-01T00:00:00",
        architecture="tiny",
        input_size=SIZE,
        threshold=0.5,
        train_subjects=["1"],
        val_subjects=["2"],
        sha256=sha256_file(path),
        validation=ValidationMetrics(weighted_f1=0.9, auc=0.9, sensitivity=0.9, specificity=0.8, accuracy=0.9),
    )


def _publish_without_export(store: str, tmp_path: Path, version: str = "v0") -> ModelManifest:
    model = build_model("tiny", SIZE, seed=0)
    path = tmp_path / "legacy.keras"
    model.save(path)
    manifest = _manifest(path, version)
    Registry(store).publish(path, manifest)
    return manifest


def test_models_export_adds_the_export_to_an_older_version(tmp_path: Path) -> None:
    from allscore.cli import app

    store = str(tmp_path / "store")
    _publish_without_export(store, tmp_path)
    registry = Registry(store)
    manifest_file = tmp_path / "store" / "legacy" / "v0" / "manifest.json"
    before = manifest_file.read_bytes()
    with pytest.raises(ExportMissing, match=r"allscore models export legacy:v0 --store"):
        registry.fetch_export("legacy:v0")

    result = CliRunner().invoke(app, ["models", "export", "legacy:v0", "--store", store])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "legacy:v0"
    record = registry.resolve("legacy:v0").exports["onnx"]
    assert "synthetic cells" in record.checked_on  # its data set is not on this machine
    assert manifest_file.read_bytes() == before  # the version's manifest is never rewritten
    assert (manifest_file.parent / "export.onnx.json").exists()
    path, _ = registry.fetch_export("legacy:v0")
    assert sha256_file(path) == record.sha256
    cells = synthetic_check_cells(SIZE, n=8, seed=5)
    expected = predict_proba(build_model("tiny", SIZE, seed=0), cells, 8)
    np.testing.assert_allclose(predict_proba(OnnxServingModel(path), cells, 8), expected, atol=EXPORT_TOLERANCE)
    # Again: nothing to do, nothing overwritten.
    again = CliRunner().invoke(app, ["models", "export", "legacy:v0", "--store", store])
    assert again.exit_code == 0, again.output
    with pytest.raises(VersionExists):
        registry.publish_export("legacy:v0", "onnx", path, record)


def test_a_record_names_only_model_onnx_files() -> None:
    with pytest.raises(ValueError, match=r"model\*\.onnx"):
        ServingExport(file="../../etc/passwd", sha256="0", max_abs_diff=0, tolerance=1)


def test_auto_serves_the_fastest_combination_the_cpu_install_and_version_allow() -> None:
    from core.runtimes import Serving, choose_serving

    def auto(
        exports: set[str], bf16: bool, tf: bool = True, ort: bool = True, runtime: str = "auto", ov: bool = False
    ) -> tuple:
        s = choose_serving(
            runtime, "auto", exports, bf16=bf16, have_tensorflow=tf, have_onnxruntime=ort, have_openvino=ov
        )
        assert isinstance(s, Serving) and s.why
        return s.runtime, s.precision, s.export

    both = {"onnx", "onnx-int8"}
    # A gated int8 export first, on any CPU; then TensorFlow's bfloat16 where the CPU has it; then model.onnx.
    assert auto(both, bf16=True) == auto(both, bf16=False) == ("onnxruntime", "int8", "onnx-int8")
    assert auto({"onnx"}, bf16=True) == ("tensorflow", "bfloat16", None)
    assert auto({"onnx"}, bf16=False) == ("onnxruntime", "float32", "onnx")
    assert auto(set(), bf16=False) == ("tensorflow", "float32", None)
    assert auto(set(), bf16=True) == ("tensorflow", "bfloat16", None)
    # Without ONNX Runtime installed, TensorFlow; without TensorFlow (worker-onnx), ONNX Runtime, even for a version
    # without an export (refused when fetched, with the command that makes one).
    assert auto(both, bf16=False, ort=False) == ("tensorflow", "float32", None)
    assert auto({"onnx"}, bf16=True, tf=False) == ("onnxruntime", "float32", "onnx")
    assert auto(set(), bf16=True, tf=False) == ("onnxruntime", "float32", "onnx")
    # A runtime named: auto picks the precision within it.
    assert auto(both, bf16=True, runtime="tensorflow") == ("tensorflow", "bfloat16", None)
    assert auto(both, bf16=False, runtime="tensorflow") == ("tensorflow", "float32", None)
    assert auto({"onnx"}, bf16=True, runtime="onnxruntime") == ("onnxruntime", "float32", "onnx")
    # With OpenVINO installed it serves the int8 export and, where the CPU computes it, bfloat16 (both measured
    # faster: bench/README.md); float32 stays with ONNX Runtime, or OpenVINO when it is the only ONNX runtime.
    assert auto(both, bf16=False, ov=True) == ("openvino", "int8", "onnx-int8")
    assert auto({"onnx"}, bf16=True, ov=True) == ("openvino", "bfloat16", "onnx")
    assert auto({"onnx"}, bf16=False, ov=True) == ("onnxruntime", "float32", "onnx")
    assert auto({"onnx"}, bf16=False, ov=True, ort=False) == ("openvino", "float32", "onnx")
    assert auto(set(), bf16=True, ov=True) == ("tensorflow", "bfloat16", None)
    assert auto(set(), bf16=True, ov=True, ort=False, tf=False) == ("openvino", "float32", "onnx")
    assert auto(both, bf16=True, ov=True, runtime="onnxruntime") == ("onnxruntime", "int8", "onnx-int8")
    assert auto({"onnx"}, bf16=True, ov=True, runtime="tensorflow") == ("tensorflow", "bfloat16", None)
    assert auto({"onnx"}, bf16=False, ov=True, runtime="openvino") == ("openvino", "float32", "onnx")
    # A precision named is served as asked.
    explicit = choose_serving("auto", "float32", both, bf16=True, have_tensorflow=True, have_onnxruntime=True)
    assert (explicit.runtime, explicit.precision, explicit.export) == (
        ("onnxruntime", "float32", "onnx") if onnxruntime_available() else ("tensorflow", "float32", None)
    )
    explicit = choose_serving("openvino", "bfloat16", both)
    assert (explicit.runtime, explicit.precision, explicit.export) == ("openvino", "bfloat16", "onnx")
    explicit = choose_serving("tensorflow", "bfloat16", both)
    assert (explicit.runtime, explicit.precision, explicit.export) == ("tensorflow", "bfloat16", None)


def test_choose_runtime() -> None:
    assert choose_runtime("tensorflow", True) == "tensorflow"
    assert choose_runtime("onnxruntime", False) == "onnxruntime"  # refused later, with the advice
    assert choose_runtime("auto", False) == "tensorflow"
    assert choose_runtime("auto", True) == ("onnxruntime" if onnxruntime_available() else "tensorflow")
    with pytest.raises(ValueError):
        choose_runtime("tensorrt", True)


@pytest.mark.parametrize("openvino", [True, False])
def test_bfloat16_asked_for_by_name_is_served_where_auto_would_serve_it(
    monkeypatch: pytest.MonkeyPatch, openvino: bool
) -> None:
    # On a CPU that computes bfloat16, auto serves it with OpenVINO on the ONNX export where OpenVINO is installed;
    # ALLSCORE_PRECISION=bfloat16 with the runtime left to auto goes the same way (it went to TensorFlow, which a
    # worker-onnx image does not carry), and to TensorFlow for a version without the export.
    import core.runtimes as runtimes

    monkeypatch.setattr(runtimes, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(runtimes, "openvino_available", lambda: openvino)
    assert choose_runtime("auto", True, "bfloat16") == ("openvino" if openvino else "tensorflow")
    assert choose_runtime("auto", False, "bfloat16") == "tensorflow"
    served = runtimes.choose_serving("auto", "bfloat16", {"onnx"})
    assert (served.runtime, served.export) == (("openvino", "onnx") if openvino else ("tensorflow", None))
    auto = runtimes.choose_serving("auto", "auto", {"onnx"}, bf16=True, have_openvino=openvino)
    assert (served.runtime, served.precision) == (auto.runtime, auto.precision)


_SERVE_WITHOUT_TENSORFLOW = """
import sys
import numpy as np
from core.settings import get_settings
from worker.context import WorkerContext
ctx = WorkerContext(get_settings())
loaded = ctx.model(sys.argv[1])
p = loaded.model(np.zeros((4, 32, 32, 3), dtype=np.uint8), training=False)
print("runtime", loaded.model.runtime, "shape", p.shape, "tensorflow", "tensorflow" in sys.modules)
ctx.model(sys.argv[2])
"""


def test_a_worker_process_on_onnx_runtime_never_imports_tensorflow(tiny_model: PublishedModel, tmp_path: Path) -> None:
    # A store of its own (the tiny model's is shared by the session): the tiny model with its export, and a
    # version published without one.
    store = str(tmp_path / "store")
    source = Registry(tiny_model.store)
    keras_file, manifest = source.fetch(tiny_model.ref)
    Registry(store).publish(keras_file, manifest, exports={"onnx": source.fetch_export(tiny_model.ref)[0]})
    _publish_without_export(store, tmp_path, version="noexport")
    env = {
        **os.environ,
        "ALLSCORE_HOME": str(tmp_path / "home"),
        "ALLSCORE_MODEL_STORE": store,
        "ALLSCORE_RUNTIME": "onnxruntime",
        "ALLSCORE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_WITHOUT_TENSORFLOW, tiny_model.ref, "legacy:noexport"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "runtime onnxruntime shape (4, 1) tensorflow False" in done.stdout, done.stderr
    # The version without an export is refused, with the command that makes one.
    assert "ExportMissing" in done.stderr and "allscore models export legacy:noexport" in done.stderr


def test_load_runtime_model_tensorflow(tiny_model: PublishedModel) -> None:
    path, _ = Registry(tiny_model.store).fetch(tiny_model.ref)
    model = load_runtime_model("tensorflow", path)
    assert model.runtime == "tensorflow"
    onnx_path, _ = Registry(tiny_model.store).fetch_export(tiny_model.ref)
    cells = synthetic_check_cells(SIZE, n=8, seed=7)
    np.testing.assert_allclose(
        predict_proba(load_runtime_model("onnxruntime", onnx_path), cells, 8),
        predict_proba(model, cells, 8),
        atol=EXPORT_TOLERANCE,
    )


# --- int8 ------------------------------------------------------------------------------------------------------


def _copy_store(tiny_model: PublishedModel, tmp_path: Path) -> str:
    """The tiny model (with its float32 export) in a store of this test's own."""
    store = str(tmp_path / "store")
    source = Registry(tiny_model.store)
    keras_file, manifest = source.fetch(tiny_model.ref)
    Registry(store).publish(keras_file, manifest, exports={"onnx": source.fetch_export(tiny_model.ref)[0]})
    return store


_SERVE_INT8 = """
import sys
import numpy as np
from core.settings import get_settings
from worker.context import WorkerContext
loaded = WorkerContext(get_settings()).model(sys.argv[1])
p = loaded.model(np.zeros((4, 32, 32, 3), dtype=np.uint8), training=False)
m = loaded.model
print("precision", m.precision, m.runtime, "shape", p.shape, "tensorflow", "tensorflow" in sys.modules)
"""


@pytest.fixture(scope="module")
def confident_model(tmp_path_factory: pytest.TempPathFactory) -> PublishedModel:
    """A tiny 32x32 model that separates its validation cells with a margin, on enough of them that the gate's
    weighted F1 moves by under 0.01 a flipped call (112 gated cells). The session's tiny_model is not one: after 8
    epochs at the default rate every p(all) it gives sits within 0.006 of its threshold, and the gate rightly refuses
    its int8 export about one time in two."""
    from trainer.synth import synthesize
    from trainer.train import TrainConfig, publish, train_model

    data = tmp_path_factory.mktemp("confident") / "data"
    synthesize(data, subjects=6, cells=150, seed=0)
    config = TrainConfig(
        name="tiny", arch="tiny", image_size=SIZE, epochs=20, patience=20, learning_rate=1e-2, seed=0, version="v1"
    )
    outcome = train_model(data, config, Console(stderr=True, quiet=True))
    store = str(tmp_path_factory.mktemp("confident") / "models")
    return PublishedModel(store=store, ref=publish(outcome, store).ref, manifest=outcome.manifest, data=data)


def test_int8_export_is_calibrated_and_gated_on_other_cells_of_both_classes(
    confident_model: PublishedModel, tmp_path: Path
) -> None:
    from allscore.cli import app

    store = _copy_store(confident_model, tmp_path)
    registry = Registry(store)
    with pytest.raises(ExportMissing, match=r"--int8"):
        registry.fetch_export(confident_model.ref, "onnx-int8")
    result = CliRunner().invoke(
        app, ["models", "export", confident_model.ref, "--int8", "--store", store, "--data", str(confident_model.data)]
    )
    assert result.exit_code == 0, result.output
    record = registry.resolve(confident_model.ref).exports["onnx-int8"]
    assert record.precision == "int8" and record.file == "model-int8.onnx"
    assert record.wf1_delta is not None and record.wf1_gate == 0.01 and abs(record.wf1_delta) <= 0.01
    # One ALL and one hem validation subject: each gives alternate cells to calibration and to the gate.
    val = ", ".join(sorted(confident_model.manifest.val_subjects))
    assert record.calibrated_on.endswith(f"cells of subjects {val} (alternate cells of {val}; the other half is gated)")
    assert record.checked_on.endswith(f"cells of subjects {val}") and record.n_checked > 100
    path, _ = registry.fetch_export(confident_model.ref, "onnx-int8")
    assert sha256_file(path) == record.sha256
    model = load_runtime_model("onnxruntime", path, "int8")
    assert model.precision == "int8"
    assert np.asarray(model(synthetic_check_cells(SIZE, n=4))).shape == (4, 1)
    # A worker process on the defaults (auto) serves it, without TensorFlow: the gated int8 export comes first.
    env = {
        **os.environ,
        "ALLSCORE_HOME": str(tmp_path / "home"),
        "ALLSCORE_MODEL_STORE": store,
        "ALLSCORE_RUNTIME": "auto",
        "ALLSCORE_PRECISION": "auto",
        "ALLSCORE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_INT8, confident_model.ref],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    runtime = "openvino" if openvino_available() else "onnxruntime"
    assert f"precision int8 {runtime} shape (4, 1) tensorflow False" in done.stdout, done.stderr
    # OpenVINO runs the same int8 graph (its float layers in bfloat16 where the CPU computes it): close to ONNX
    # Runtime's on the model's own validation cells.
    cells = synthetic_check_cells(SIZE, n=32, seed=5)
    ov = load_runtime_model("openvino", path, "int8")
    assert (ov.runtime, ov.precision) == ("openvino", "int8")
    difference = np.abs(predict_proba(ov, cells, 8) - predict_proba(model, cells, 8))
    assert difference.max() < 0.05 and difference.mean() < 0.01, difference


def _cells(subjects: dict[str, int], n: int = 6) -> list:
    from trainer.dataset import CellRecord

    return [CellRecord(Path(f"{s}/{i}.bmp"), label, s, "0") for s, label in subjects.items() for i in range(n)]


def test_int8_cells_split_by_subject_within_each_class() -> None:
    from trainer.export import split_validation

    cells = _cells({"1": 1, "2": 1, "3": 1, "H1": 0, "H2": 0})
    calibrate, gate, calibrate_subjects, gate_subjects, shared = split_validation(cells)
    assert (calibrate_subjects, gate_subjects, shared) == (["1", "3", "H1"], ["2", "H2"], [])
    assert {c.subject for c in calibrate} == {"1", "3", "H1"} and {c.subject for c in gate} == {"2", "H2"}
    assert {c.label for c in calibrate} == {c.label for c in gate} == {0, 1}


def test_int8_cells_of_a_class_with_one_subject_alternate() -> None:
    from trainer.export import ExportMismatch, split_validation

    cells = _cells({"7": 1, "H7": 0, "H8": 0})
    calibrate, gate, calibrate_subjects, gate_subjects, shared = split_validation(cells)
    assert shared == ["7"] and calibrate_subjects == ["7", "H7"] and gate_subjects == ["7", "H8"]
    assert not {c.path for c in calibrate} & {c.path for c in gate}
    assert {c.label for c in calibrate} == {c.label for c in gate} == {0, 1}
    with pytest.raises(ExportMismatch, match="at least two subjects"):
        split_validation(_cells({"7": 1}))


def test_an_int8_model_that_fails_the_gate_is_refused(tiny_model: PublishedModel, tmp_path: Path) -> None:
    from trainer.discovery import discover
    from trainer.export import ExportMismatch, make_int8_export
    from trainer.loading import decode_cells

    float_path, manifest = Registry(tiny_model.store).fetch_export(tiny_model.ref)
    held = [c for c in discover(tiny_model.data).cells if c.subject in set(manifest.val_subjects)]
    cells = decode_cells(held, SIZE)
    # Calibrated on black images, every activation range is near zero: the quantized model saturates.
    black = np.zeros((32, SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(ExportMismatch, match="refused"):
        make_int8_export(
            float_path,
            tmp_path,
            calibration=black,
            calibrated_on="32 black images",
            held_out=cells.images,
            labels=cells.labels,
            held_out_on="the validation cells",
            threshold=manifest.threshold,
        )


@pytest.mark.parametrize(("agreement", "kept"), [(1.0, 0), (-1.0, 3)])
def test_int8_keeps_its_first_convolutions_in_float32_until_it_agrees(
    tiny_model: PublishedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agreement: float, kept: int
) -> None:
    # Accuracy-aware quantization: where the int8 model's p(all) on the calibration cells moves by more than
    # INT8_AGREEMENT from float32's, the stem stays float32, one more convolution at a time (up to 3); the manifest's
    # converter says how many. An agreement no model meets (-1) keeps 3 (or all there are); one every model meets (1.0)
    # keeps none.
    import onnx

    import trainer.export
    from trainer.discovery import discover
    from trainer.export import make_int8_export
    from trainer.loading import decode_cells

    monkeypatch.setattr(trainer.export, "INT8_AGREEMENT", agreement)
    float_path, manifest = Registry(tiny_model.store).fetch_export(tiny_model.ref)
    cells = decode_cells([c for c in discover(tiny_model.data).cells if c.subject in set(manifest.val_subjects)], SIZE)
    path, record = make_int8_export(
        float_path,
        tmp_path,
        calibration=cells.images[0::2],
        calibrated_on="even validation cells",
        held_out=cells.images[1::2],
        labels=cells.labels[1::2],
        held_out_on="odd validation cells",
        threshold=manifest.threshold,
        gate=1.0,
    )
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    kept = min(kept, len(convs))  # the tiny model has two
    int8_weights = [n.input[1] in dequantized for n in convs]
    assert int8_weights == [False] * kept + [True] * (len(convs) - kept)
    assert (f"first {kept} convolution(s) float32" in record.converter) == bool(kept)


def test_int8_is_served_by_the_onnx_runtimes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings

    monkeypatch.setenv("ALLSCORE_PRECISION", "int8")
    monkeypatch.setenv("ALLSCORE_RUNTIME", "tensorflow")
    with pytest.raises(ValueError, match="ONNX Runtime or OpenVINO only"):
        Settings()
    assert choose_runtime("auto", False, "int8") == ("openvino" if openvino_available() else "onnxruntime")


def test_an_export_added_to_a_version_on_s3(tiny_model: PublishedModel, s3_bucket: str, tmp_path: Path) -> None:
    """On an S3 store (moto over HTTP): the late export is written once beside the version and resolves with it."""
    source = Registry(tiny_model.store)
    keras_file, manifest = source.fetch(tiny_model.ref)
    onnx_file, _ = source.fetch_export(tiny_model.ref)
    record = manifest.exports["onnx"]
    store = f"{s3_bucket}/models"
    registry = Registry(store)
    registry.publish(keras_file, manifest.model_copy(update={"exports": {}}))  # as published before exports
    with pytest.raises(ExportMissing):
        registry.fetch_export(tiny_model.ref)
    assert registry.publish_export(tiny_model.ref, "onnx", onnx_file, record).exports["onnx"] == record
    assert Registry(store).resolve(tiny_model.ref).exports["onnx"] == record
    path, _ = Registry(store).fetch_export(tiny_model.ref, cache_dir=tmp_path / "cache")
    assert sha256_file(path) == record.sha256
    with pytest.raises(VersionExists):
        registry.publish_export(tiny_model.ref, "onnx", onnx_file, record)

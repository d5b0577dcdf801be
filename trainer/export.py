"""Serving exports: the model in ONNX for TensorFlow-free workers, checked against model.keras before publishing.

The export is the model as the TensorFlow worker serves it in float32 (`core.inference.prepare_for_serving`: batch
normalisation folded, dropout gone), converted with tf2onnx (`tf2onnx.convert.from_keras`, a uint8 input `image` of
any batch size, opset 17). Keras 3's own `model.export(format="onnx")` calls the same converter but refuses a
functional model that was loaded and never called ("The model provided has never called"), which a published
model.keras is (keras-team/keras#20710 added that export on top of tf2onnx, which it notes broke with numpy >= 2,
onnx/tensorflow-onnx#2373; tf2onnx 1.17.0 converts these models with numpy 2.4, TensorFlow 2.21 and protobuf 7, and
tf2onnx's own CI covers TensorFlow only up to 2.15). Before anything is published, ONNX Runtime's p(all) on the
check cells must be within EXPORT_TOLERANCE of model.keras's own (the Keras model as loaded, called directly); the
difference and the cells are recorded in the manifest (`exports.onnx`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.artifact import Registry, load_keras
from core.errors import AllscoreError
from core.imaging import model_input
from core.inference import configure_tensorflow, predict_proba, prepare_for_serving
from core.manifest import INT8_FILE, ONNX_FILE, ModelManifest, ServingExport, parse_ref, sha256_file
from core.runtimes import OnnxServingModel
from core.settings import Settings, get_settings
from core.stainnorm import normalise_groups
from trainer.dataset import CellRecord, group_by_subject, subject_classes
from trainer.discovery import discover
from trainer.loading import decode_cells
from trainer.metrics import weighted_f1

log = logging.getLogger(__name__)

# The largest |p(all)| difference between ONNX Runtime and model.keras an export may show on its check cells. Both
# compute in float32 with different kernels and summation orders: seen up to about 1e-6 on trained models.
EXPORT_TOLERANCE = 1e-4
ONNX_OPSET = 17
# At most this many validation cells (a deterministic, evenly spaced sample) check an export.
CHECK_CELLS = 256
# An int8 export is published only if held-out weighted F1 (at the version's threshold) moves by at most this much
# from the float32 export's.
INT8_WF1_GATE = 0.01
# Before the gate, the int8 model must agree with the float32 export on the calibration cells (no labels used): mean
# |p(all) int8 - p(all) float32| at most INT8_AGREEMENT. Where it does not, the first convolutions (the stem, which
# sees the raw pixels) stay in float32, one more at a time, up to INT8_MAX_FLOAT_CONVS: accuracy-aware quantization,
# as OpenVINO's NNCF does it, with the choice made on the calibration cells so the gate's cells judge it once.
INT8_AGREEMENT = 0.01
INT8_MAX_FLOAT_CONVS = 3


class ExportMismatch(AllscoreError):
    """The export's outputs differ from model.keras's by more than the tolerance: it is not published."""


class ExportUnavailable(AllscoreError):
    """The converter (tf2onnx, onnx, onnxruntime: allscore[onnx]) is not installed."""


def converter_available() -> bool:
    """Whether tf2onnx and ONNX Runtime import (both are needed to export and check)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("tf2onnx", "onnx", "onnxruntime"))


def export_onnx(model: Any, out: Path) -> str:
    """Write the float32 serving form of a Keras model to `out` as ONNX; return the converter and its version."""
    if not converter_available():
        raise ExportUnavailable(
            "exporting to ONNX needs tf2onnx, onnx and onnxruntime: pip install 'allscore[onnx,trainer]'"
        )
    import tensorflow as tf
    import tf2onnx

    served = prepare_for_serving(model, "float32")
    shape = tuple(model.inputs[0].shape[1:])
    spec = (tf.TensorSpec((None, *shape), tf.uint8, name="image"),)
    tf2onnx.convert.from_keras(served, input_signature=spec, opset=ONNX_OPSET, output_path=str(out))
    return f"tf2onnx {tf2onnx.__version__}"


def max_difference(model: Any, onnx_path: Path, images: np.ndarray, threads: int = 0) -> float:
    """The largest |p(all)| difference between model.keras (called directly) and ONNX Runtime on `images`."""
    if len(images) == 0:
        raise ExportMismatch("no cells to check the export on")
    expected = predict_proba(model, images, batch_size=64)
    got = predict_proba(OnnxServingModel(onnx_path, threads), images, batch_size=64)
    return float(np.max(np.abs(expected - got)))


def make_onnx_export(
    model: Any, out_dir: Path, images: np.ndarray, checked_on: str, tolerance: float = EXPORT_TOLERANCE
) -> tuple[Path, ServingExport]:
    """Export `model` to out_dir/model.onnx and check it on `images`; ExportMismatch past the tolerance."""
    path = out_dir / ONNX_FILE
    converter = export_onnx(model, path)
    difference = max_difference(model, path, images)
    if not difference <= tolerance:
        raise ExportMismatch(
            f"the ONNX export differs from model.keras by up to {difference:.3g} in p(all) on {checked_on} "
            f"(tolerance {tolerance:g}): not published"
        )
    record = ServingExport(
        format="onnx",
        file=ONNX_FILE,
        sha256=sha256_file(path),
        precision="float32",
        converter=converter,
        opset=ONNX_OPSET,
        max_abs_diff=difference,
        tolerance=tolerance,
        checked_on=checked_on,
        n_checked=len(images),
        created_at=datetime.now(UTC).isoformat(),
    )
    log.info("ONNX export checked on %s: max |dp| %.3g (tolerance %g)", checked_on, difference, tolerance)
    return path, record


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    """Indices of a deterministic, evenly spaced sample of at most n of n_total items."""
    if n_total <= n:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))


def synthetic_check_cells(size: int, n: int = 64, seed: int = 0) -> np.ndarray:
    """n synthetic cells (half malignant) at the model's input size, the same for the same seed."""
    from trainer.synth import render_cell

    rng = np.random.default_rng(seed)
    return np.stack([model_input(render_cell(rng, i % 2 == 0), size) for i in range(n)])


def as_served(manifest: ModelManifest, images: np.ndarray, subjects: Sequence[str | None]) -> np.ndarray:
    """Cells as a worker feeds them to this version: normalised per subject (a slide) when it was trained so."""
    if manifest.stain_norm is None:
        return images
    return normalise_groups(images, subjects, manifest.stain_norm.target())


def check_cells(manifest: ModelManifest, data: Path | None = None, n: int = CHECK_CELLS) -> tuple[np.ndarray, str]:
    """The cells an export of a published version is checked on: its validation cells (the held-out subjects of
    `data`, else of the data set it was trained on, when that is on this machine), else synthetic cells."""
    source = data or (Path(manifest.data) if manifest.data else None)
    if source is not None and source.exists():
        held_out = set(manifest.val_subjects)
        cells = [c for c in discover(source).cells if c.subject in held_out]
        if cells:
            chosen = [cells[i] for i in evenly_spaced(len(cells), n)]
            arrays = decode_cells(chosen, manifest.input_size)
            if len(arrays.images):
                return as_served(manifest, arrays.images, arrays.subjects), (
                    f"{len(arrays.images)} validation cells of {source}"
                )
        if data is not None:
            log.warning("%s holds none of %s's validation subjects: checking on synthetic cells", data, manifest.ref)
    images = synthetic_check_cells(manifest.input_size)
    return as_served(manifest, images, [None] * len(images)), f"{len(images)} synthetic cells (seed 0)"


def export_published(
    ref: str, *, store: str | None = None, data: Path | None = None, settings: Settings | None = None
) -> ModelManifest:
    """Export a published version that has no ONNX export, check it against its model.keras, and publish it
    beside the version (model.onnx + export.onnx.json); return the manifest as it now resolves."""
    settings = settings or get_settings()
    configure_tensorflow(settings.tf_threads)
    registry = Registry(store, settings)
    path, manifest = registry.fetch(ref)
    if "onnx" in manifest.exports:
        log.info("%s already has an ONNX export", manifest.ref)
        return manifest
    model = load_keras(path)
    images, checked_on = check_cells(manifest, data)
    with tempfile.TemporaryDirectory(prefix="allscore-export-") as tmp:
        onnx_path, record = make_onnx_export(model, Path(tmp), images, checked_on)
        # The version fetched, not what an alias points at by now.
        return registry.publish_export(ref if parse_ref(ref).uri else manifest.ref, "onnx", onnx_path, record)


# --- int8 -------------------------------------------------------------------------------------------------------


def quantize_int8(
    float_path: Path,
    out: Path,
    calibration: np.ndarray,
    batch: int = 16,
    agrees: Callable[[Path, int], bool] | None = None,
) -> str:
    """Static int8 quantization of a float32 ONNX model with ONNX Runtime: QDQ format, per-channel int8 weights,
    uint8 activations whose ranges come from running `calibration` (uint8 cells) through the model. With `agrees`
    (`agreement`), the first convolutions (in graph order) stay float32, one more at a time up to
    INT8_MAX_FLOAT_CONVS, until `agrees(out, n)` says the model written to `out` is close enough; the model is
    prepared (shape inference, graph clean-up) once for every try."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Cells(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = out.with_name(out.stem + "-prepared.onnx")
    quant_pre_process(str(float_path), str(prepared))
    convs = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
    for float_convs in range(min(INT8_MAX_FLOAT_CONVS, len(convs)) + 1):
        quantize_static(
            str(prepared),
            str(out),
            Cells(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=convs[:float_convs],
        )
        if agrees is None or agrees(out, float_convs):
            break
    prepared.unlink(missing_ok=True)
    kept = f"; first {float_convs} convolution(s) float32" if float_convs else ""
    return f"onnxruntime.quantization {onnxruntime.__version__} (static, QDQ, per-channel int8 weights{kept})"


def agreement(float_path: Path, calibration: np.ndarray) -> Callable[[Path, int], bool]:
    """Whether an int8 model agrees with the float32 export on the calibration cells: mean |p(all) int8 - p(all)
    float32| at most INT8_AGREEMENT (no labels used), for quantize_int8."""
    reference = predict_proba(OnnxServingModel(float_path), calibration, batch_size=64)

    def agrees(path: Path, float_convs: int) -> bool:
        moved = float(np.mean(np.abs(predict_proba(OnnxServingModel(path, precision="int8"), calibration) - reference)))
        log.info(
            "int8, first %d convolution(s) float32: mean |p| change %.4f on the calibration cells", float_convs, moved
        )
        return moved <= INT8_AGREEMENT

    return agrees


def make_int8_export(
    float_path: Path,
    out_dir: Path,
    *,
    calibration: np.ndarray,
    calibrated_on: str,
    held_out: np.ndarray,
    labels: np.ndarray,
    held_out_on: str,
    threshold: float,
    gate: float = INT8_WF1_GATE,
) -> tuple[Path, ServingExport]:
    """Quantize the float32 export on the calibration cells, with as few leading convolutions left in float32 as
    agreement with float32 on those cells allows (INT8_AGREEMENT), and gate it on held-out cells (other subjects):
    weighted F1 at `threshold` may move by at most `gate` from the float32 export's, else ExportMismatch (not
    published)."""
    path = out_dir / INT8_FILE
    converter = quantize_int8(float_path, path, calibration, agrees=agreement(float_path, calibration))
    p32 = predict_proba(OnnxServingModel(float_path), held_out, batch_size=64)
    p8 = predict_proba(OnnxServingModel(path, precision="int8"), held_out, batch_size=64)
    wf32 = weighted_f1(labels, (p32 >= threshold).astype(int))
    wf8 = weighted_f1(labels, (p8 >= threshold).astype(int))
    delta = wf8 - wf32
    if not abs(delta) <= gate:
        raise ExportMismatch(
            f"the int8 export moved weighted F1 on {held_out_on} from {wf32:.4f} to {wf8:.4f} "
            f"({delta:+.4f}; gate {gate}): refused, not published; serve this version in float32"
        )
    record = ServingExport(
        format="onnx",
        file=INT8_FILE,
        sha256=sha256_file(path),
        precision="int8",
        converter=converter,
        opset=ONNX_OPSET,
        max_abs_diff=float(np.max(np.abs(p8 - p32))),
        tolerance=None,
        checked_on=held_out_on,
        n_checked=len(held_out),
        created_at=datetime.now(UTC).isoformat(),
        calibrated_on=calibrated_on,
        wf1_float32=round(wf32, 6),
        wf1_int8=round(wf8, 6),
        wf1_delta=round(delta, 6),
        wf1_gate=gate,
    )
    log.info("int8 export: weighted F1 %.4f -> %.4f on %s", wf32, wf8, held_out_on)
    return path, record


def split_validation(
    cells: list[CellRecord], n: int = CHECK_CELLS
) -> tuple[list[CellRecord], list[CellRecord], list[str], list[str], list[str]]:
    """The validation cells split in two: (calibration cells, held-out cells, their subjects, the subjects both
    hold). Each class's subjects alternate in sorted order, so that both halves hold ALL and hem cells: activation
    ranges calibrated on one class only saturate on the other (README, "Serving runtimes"). The gate never sees a
    calibration subject, except where a class has one validation subject only (a small fold): that subject's cells
    alternate instead, and the gate never sees a calibration cell."""
    by_subject = group_by_subject(cells)
    if len(by_subject) < 2:
        raise ExportMismatch("int8 needs validation cells of at least two subjects (one to calibrate, one to gate)")
    classes: dict[int, list[str]] = {}
    for subject, label in subject_classes(by_subject).items():
        classes.setdefault(label, []).append(subject)
    first: list[CellRecord] = []
    second: list[CellRecord] = []
    calibrate: list[str] = []
    gate: list[str] = []
    shared: list[str] = []
    for subjects in classes.values():
        if len(subjects) == 1:
            own = by_subject[subjects[0]]
            first += own[0::2]
            second += own[1::2]
            shared.append(subjects[0])
            continue
        calibrate += subjects[0::2]
        gate += subjects[1::2]
        first += [c for s in subjects[0::2] for c in by_subject[s]]
        second += [c for s in subjects[1::2] for c in by_subject[s]]
    return (
        [first[i] for i in evenly_spaced(len(first), n)],
        [second[i] for i in evenly_spaced(len(second), 4 * n)],
        sorted(calibrate + shared),
        sorted(gate + shared),
        shared,
    )


def int8_cells(manifest: ModelManifest, data: Path | None = None) -> tuple[Any, str, Any, str]:
    """The decoded cells an int8 export of the version is calibrated on and gated on: its validation subjects
    (from `data`, else the data set it was trained on), split in two; (calibration, its description, held-out
    arrays with labels, their description)."""
    source = data or (Path(manifest.data) if manifest.data else None)
    if source is None or not source.exists():
        raise ExportMismatch(
            f"int8 is calibrated and gated on {manifest.ref}'s validation subjects: give --data with them "
            f"({', '.join(manifest.val_subjects[:6])}...)"
        )
    held = set(manifest.val_subjects)
    cells = [c for c in discover(source).cells if c.subject in held and c.label is not None]
    calibrate, gate, calibrate_subjects, gate_subjects, shared = split_validation(cells)
    calibration = decode_cells(calibrate, manifest.input_size)
    held_out = decode_cells(gate, manifest.input_size)
    calibration.images = as_served(manifest, calibration.images, calibration.subjects)
    held_out.images = as_served(manifest, held_out.images, held_out.subjects)
    halves = f" (alternate cells of {', '.join(shared)}; the other half is gated)" if shared else ""
    return (
        calibration.images,
        f"{len(calibration.images)} validation cells of subjects {', '.join(calibrate_subjects)}{halves}",
        held_out,
        f"{len(held_out.images)} validation cells of subjects {', '.join(gate_subjects)}",
    )


def export_int8_published(
    ref: str, *, store: str | None = None, data: Path | None = None, settings: Settings | None = None
) -> ModelManifest:
    """Quantize a published version's float32 ONNX export to int8, calibrated on half of its validation subjects
    and gated on the other half (weighted F1 within INT8_WF1_GATE), and publish it beside the version."""
    settings = settings or get_settings()
    registry = Registry(store, settings)
    manifest = registry.resolve(ref)
    if "onnx-int8" in manifest.exports:
        log.info("%s already has an int8 export", manifest.ref)
        return manifest
    if "onnx" not in manifest.exports:
        manifest = export_published(ref, store=store, data=data, settings=settings)
    calibration, calibrated_on, held_out, held_out_on = int8_cells(manifest, data)
    pinned = ref if parse_ref(ref).uri else manifest.ref
    float_path, _ = registry.fetch_export(pinned)
    with tempfile.TemporaryDirectory(prefix="allscore-int8-") as tmp:
        path, record = make_int8_export(
            float_path,
            Path(tmp),
            calibration=calibration,
            calibrated_on=calibrated_on,
            held_out=held_out.images,
            labels=held_out.labels,
            held_out_on=held_out_on,
            threshold=manifest.threshold,
        )
        return registry.publish_export(pinned, "onnx-int8", path, record)

"""What a published model version is: its file names, the manifest and its records (validation metrics, serving
exports), references to a version (name:version, name@alias, name, URI) and their parsing, the model errors, the
version string and the sha256 of a file. The registry that stores versions and the loading are in core.artifact.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from core.errors import AllscoreError
from core.stainnorm import FIT_CELLS, StainStats
from core.stainnorm import METHOD as STAIN_METHOD

MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
# Serving exports by key: the float32 ONNX model, and its int8 quantization (ALLSCORE_PRECISION=int8).
EXPORT_KEYS = ("onnx", "onnx-int8")
_EXPORT_FILE_RE = re.compile(r"^model[A-Za-z0-9_-]*\.onnx$")
POSITIVE_CLASS = "all"
# Index i of the model's output space; the single sigmoid output is p(class_names[1]) = p(all).
CLASS_NAMES = ("hem", "all")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelError(AllscoreError):
    """A model reference that cannot be resolved, published or loaded."""


class ModelNotFound(ModelError):
    """No model, version or alias by that reference."""


class VersionExists(ModelError):
    """A version is immutable: publishing over an existing one is refused."""


class ModelIntegrityError(ModelError):
    """model.keras does not match the sha256 recorded in its manifest."""


class ExportMissing(ModelNotFound):
    """The version has no export in the format a TensorFlow-free runtime needs."""


def export_record_file(key: str) -> str:
    """The file name of the record of an export added to a version after it was published."""
    return f"export.{key}.json"


class ValidationMetrics(BaseModel):
    """Metrics measured on the held-out (by subject) validation side, positive class `all`."""

    weighted_f1: float
    auc: float | None
    sensitivity: float | None
    specificity: float | None
    accuracy: float
    per_subject_accuracy: dict[str, float] = Field(default_factory=dict)
    mean_subject_accuracy: float | None = None
    confusion: dict[str, int] = Field(default_factory=dict)  # tp, fp, tn, fn
    n_cells: int = 0
    n_subjects: int = 0


class ServingExport(BaseModel):
    """A serving format of the model (ONNX), made from model.keras and checked against it before publishing."""

    format: str = "onnx"
    file: str = ONNX_FILE
    sha256: str
    precision: str = "float32"
    converter: str = ""  # e.g. "tf2onnx 1.17.0"
    opset: int | None = None
    # The largest |p(all) difference| from model.keras over the checked cells, and the bound it had to be within
    # (none for int8, which is held to weighted F1 instead).
    max_abs_diff: float
    tolerance: float | None
    checked_on: str = ""  # which cells: the validation cells of the version, or a deterministic synthetic sample
    n_checked: int = 0
    created_at: str = ""
    # int8 only: the cells it was calibrated on, and weighted F1 at the version's threshold on held-out subjects
    # (never its calibration cells), float32 export against int8; published only if |delta| <= wf1_gate.
    calibrated_on: str = ""
    wf1_float32: float | None = None
    wf1_int8: float | None = None
    wf1_delta: float | None = None
    wf1_gate: float | None = None

    @field_validator("file")
    @classmethod
    def _safe_file(cls, value: str) -> str:
        # The file name becomes a path in the store and the cache: model*.onnx, no separators.
        if not _EXPORT_FILE_RE.match(value):
            raise ValueError(f"export file {value!r}: must be model*.onnx")
        return value


class StainNormRecord(BaseModel):
    """Per-sample stain normalisation (core/stainnorm.py): the model was trained on cells normalised subject by
    subject onto `target`, and is served each sample's cells normalised onto it with the sample's own statistics
    (fitted on its first `fit_cells` cells)."""

    method: str = STAIN_METHOD
    target_mean: list[float]
    target_std: list[float]
    target_cells: int = 0
    fit_cells: int = FIT_CELLS
    fitted_on: str = ""

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value != STAIN_METHOD:
            raise ValueError(f"stain normalisation {value!r}: this allscore knows only {STAIN_METHOD!r}; upgrade it")
        return value

    def target(self) -> StainStats:
        return StainStats.of(self.target_mean, self.target_std, n_cells=self.target_cells)

    @classmethod
    def from_target(cls, target: StainStats, fitted_on: str) -> StainNormRecord:
        return cls(
            target_mean=[round(v, 6) for v in target.mean],
            target_std=[round(v, 6) for v in target.std],
            target_cells=target.n_cells,
            fitted_on=fitted_on,
        )


class ModelManifest(BaseModel):
    """What a published version is, how it was made and how well it did on held-out subjects."""

    name: str
    version: str
    created_at: str
    architecture: str
    input_size: int
    input_dtype: str = "uint8"
    class_names: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    positive_class: str = POSITIVE_CLASS
    output: str = "sigmoid p(positive_class), shape (batch, 1)"
    preprocessing: str = "core.imaging.decode_image (center-crop to square, resize); rescaling inside the model"
    threshold: float
    threshold_criterion: str = "maximises weighted F1 on the validation subjects"
    # Temperature scaling (core/calibration.py): p(all) is served as sigmoid(logit(model output) / temperature), and
    # the threshold applies to that. 1.0 (no change) in versions published before it existed and without --folds.
    temperature: float = Field(default=1.0, gt=0)
    validation: ValidationMetrics
    train_subjects: list[str]
    val_subjects: list[str]
    split: str = ""
    n_train_cells: int = 0
    n_val_cells: int = 0
    training: dict[str, Any] = Field(default_factory=dict)
    sha256: str
    tensorflow_version: str = ""
    keras_version: str = ""
    data: str = ""
    # The scale of the training crops (um per pixel at 450x450): fields are cut at this scale for the model.
    # None in versions published before fields existed; they are read as the C-NMC scale.
    um_per_px: float | None = None
    um_per_px_source: str = ""
    # The training report's PNGs (ROC, confusion matrix, learning curves, per-subject accuracy), file names in the
    # version's folder; empty in versions published before the report existed.
    report_pictures: list[str] = Field(default_factory=list)
    # Serving exports by key ("onnx"), each a file beside model.keras with its sha256; empty in versions published
    # before exports existed (`allscore models export REF` adds one beside such a version: export.onnx.json).
    exports: dict[str, ServingExport] = Field(default_factory=dict)
    # Per-sample stain normalisation the version was trained with and must be served with; None: served as read.
    stain_norm: StainNormRecord | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # Names and versions become folders of the store and the cache: no separators, no '..'.
        if not _NAME_RE.match(value) or value in (".", ".."):
            raise ValueError(f"model name {value!r}: use letters, digits, '.', '_' or '-' (no path separators)")
        return value

    @field_validator("version")
    @classmethod
    def _safe_version(cls, value: str) -> str:
        if not _VERSION_RE.match(value) or value in (".", ".."):
            raise ValueError(f"model version {value!r}: use letters, digits, '.', '_' or '-' (no path separators)")
        return value

    @property
    def ref(self) -> str:
        """The reference `name:version`."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: `name:version`, `name@alias`, `name` (latest) or a URI of a version folder."""

    name: str | None = None
    version: str | None = None
    alias: str | None = None
    uri: str | None = None

    def __str__(self) -> str:
        if self.uri:
            return self.uri
        if self.version:
            return f"{self.name}:{self.version}"
        if self.alias:
            return f"{self.name}@{self.alias}"
        return str(self.name)


def parse_ref(ref: str) -> ModelRef:
    """Parse a model reference; raise ModelError naming it if it has no valid form."""
    ref = ref.strip()
    if "://" in ref or ref.startswith(("/", ".", "~")):
        uri = ref.removesuffix("/")
        for suffix in ("/" + MODEL_FILE, "/" + MANIFEST_FILE):
            uri = uri.removesuffix(suffix)
        return ModelRef(uri=str(Path(uri).expanduser()) if "://" not in uri else uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        check_name(name, ref)
        check_name(alias, ref, what="alias")
        return ModelRef(name=name, alias=alias)
    if ":" in ref:
        name, version = ref.split(":", 1)
        check_name(name, ref)
        if not _VERSION_RE.match(version):
            raise ModelError(f"model reference {ref!r}: bad version {version!r}; use name:version")
        return ModelRef(name=name, version=version)
    check_name(ref, ref)
    return ModelRef(name=ref)


def check_name(name: str, ref: str, what: str = "name") -> None:
    if not _NAME_RE.match(name):
        raise ModelError(
            f"model reference {ref!r}: bad {what} {name!r}; use letters, digits, '.', '_' or '-' "
            "(forms: name:version, name@alias, name, or the URI of a version folder)"
        )


def new_version(now: datetime | None = None) -> str:
    """A sortable, unique-enough version string: UTC timestamp to the second."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%d-%H%M%S")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""The scoring contract: the one task message every part shares, the one rule for identifiers, and the result
records a worker hands to the repository (one per cell, one per field, one summary per sample).

The client builds a ScoreMessage, the broker carries it as JSON keyword arguments, the task validates it once
(`parse_message`) and the engine and repository take it as it is. It carries ids and URIs, never pixels:

- ``job_id``, ``sample_id``: who asked, and which slide;
- ``image_uris``: the images (single cells, or microscope fields when ``kind`` is ``fields``);
- ``model_version``: the pinned ``name:version``, which is also the result key of the sample's row;
- ``model_store``: the *name* of the store the model lives in, from the worker's own list
  (ALLSCORE_MODEL_STORES); never a path, so a message cannot point a worker at a model of its choosing;
- ``submission``: the fencing token. Each (re)submission of a sample bumps a counter in its row; a delivery
  writes only while its (job_id, submission) is the row's current one, so a stale or duplicate delivery can
  never overwrite or delete a newer result;
- ``kind`` and ``um_per_px``: single-cell crops or fields, and the fields' scale when the submitter knows it.

Unknown extra fields are ignored, so a newer client can talk to an older worker during a rolling upgrade. A
message from a client before this contract (``model_ref`` instead of ``model_version``, no ``submission``) is
still read when its ``model_ref`` is a pinned ``name:version`` in the default store.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import AllscoreError

SAMPLE_ID_MAX = 128
JOB_ID_MAX = 128
MODEL_VERSION_MAX = 256
URI_MAX = 4096
DEFAULT_STORE = "default"
STORE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_MODEL_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_BAD_URI_CHARS = re.compile(r"[\x00-\x1f\x7f]")

Kind = Literal["cells", "fields"]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class InvalidIdentifier(AllscoreError, ValueError):
    """A sample, job or model id that is empty, too long, or holds control characters or edge spaces."""


class InvalidMessage(AllscoreError):
    """A task message that breaks the contract. `key` is set when the sample it names could still be told."""

    def __init__(self, message: str, key: tuple[str, str, str, int | None] | None = None) -> None:
        super().__init__(message)
        self.key = key  # (job_id, sample_id, model_version, submission)


def check_identifier(value: object, what: str, limit: int = SAMPLE_ID_MAX) -> str:
    """`value` if it can serve as an id: a non-empty printable string of at most `limit` characters."""
    if not isinstance(value, str) or not value:
        raise InvalidIdentifier(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise InvalidIdentifier(f"{what} {value[:40]!r}... is {len(value)} characters long; the limit is {limit}")
    if not value.isprintable() or value != value.strip():
        raise InvalidIdentifier(f"{what} {value!r} holds control characters or surrounding spaces; use printable text")
    return value


def check_model_version(value: object) -> str:
    """A pinned model reference `name:version` (the result key), else InvalidIdentifier."""
    text = check_identifier(value, "model version", MODEL_VERSION_MAX)
    if not _MODEL_VERSION_RE.match(text):
        raise InvalidIdentifier(f"model version {text!r} must be a pinned name:version (letters, digits, . _ -)")
    return text


def check_store_name(value: object) -> str:
    """A store name as listed in ALLSCORE_MODEL_STORES: lower-case letters, digits, '_' and '-'."""
    if not isinstance(value, str) or not STORE_NAME_RE.match(value):
        raise InvalidIdentifier(
            f"model store {value!r} must be a store name (lower-case letters, digits, '_', '-'), not a path or URI"
        )
    return value


class ScoreMessage(BaseModel):
    """One sample to score; see the module docstring for each field."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    job_id: str
    sample_id: str
    image_uris: tuple[str, ...] = Field(min_length=1)
    model_version: str
    model_store: str = DEFAULT_STORE
    submission: int | None = Field(default=None, ge=1)
    kind: Kind = "cells"
    um_per_px: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _legacy_model_ref(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "model_version" not in data and "model_ref" in data:
            return {**data, "model_version": data["model_ref"]}
        return data

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str) -> str:
        return check_identifier(value, "job id", JOB_ID_MAX)

    @field_validator("sample_id")
    @classmethod
    def _sample_id(cls, value: str) -> str:
        return check_identifier(value, "sample id", SAMPLE_ID_MAX)

    @field_validator("model_version")
    @classmethod
    def _model_version(cls, value: str) -> str:
        return check_model_version(value)

    @field_validator("model_store")
    @classmethod
    def _model_store(cls, value: str) -> str:
        return check_store_name(value)

    @field_validator("image_uris", mode="before")
    @classmethod
    def _image_uris(cls, value: Any) -> Any:
        # JSON has no tuples: a list is the wire form. A bare string is refused (it is not a list of URIs).
        if not isinstance(value, list | tuple):
            raise ValueError("image_uris must be a list of URI strings")
        for uri in value:
            if not isinstance(uri, str) or not uri or len(uri) > URI_MAX:
                raise ValueError(f"each image URI must be a non-empty string of at most {URI_MAX} characters")
            # NUL and control characters have no place in a path or key (PostgreSQL cannot even store NUL),
            # and a lone surrogate is no text at all: refused here, so they fail the sample with this reason.
            if _BAD_URI_CHARS.search(uri) or not _is_utf8(uri):
                raise ValueError(
                    f"image URI #{value.index(uri) + 1} holds a NUL, a control character or a lone surrogate; "
                    "give a plain path or s3:// key"
                )
        return tuple(value)

    @field_validator("um_per_px", mode="before")
    @classmethod
    def _um_per_px(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def to_kwargs(self) -> dict[str, Any]:
        """The message as the task's JSON keyword arguments."""
        return self.model_dump(mode="json")


def _key_of(kwargs: Mapping[str, Any]) -> tuple[str, str, str, int | None] | None:
    """(job_id, sample_id, model_version, submission) when those parts of a broken message are sound."""
    try:
        job_id = check_identifier(kwargs.get("job_id"), "job id", JOB_ID_MAX)
        sample_id = check_identifier(kwargs.get("sample_id"), "sample id")
        version = check_model_version(kwargs.get("model_version", kwargs.get("model_ref")))
    except InvalidIdentifier:
        return None
    submission = kwargs.get("submission")
    if submission is not None and (not isinstance(submission, int) or isinstance(submission, bool) or submission < 1):
        return None
    return job_id, sample_id, version, submission


def parse_message(args: Sequence[Any], kwargs: Mapping[str, Any]) -> ScoreMessage:
    """Validate a task's arguments into a ScoreMessage, or raise InvalidMessage saying what is wrong."""
    if args:
        raise InvalidMessage(f"positional arguments are not accepted (got {len(args)}); send keyword arguments")
    try:
        return ScoreMessage.model_validate(dict(kwargs))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors())
        raise InvalidMessage(f"message breaks the contract: {problems}", key=_key_of(kwargs)) from None


# -- the results ------------------------------------------------------------------------------------------------
# What the worker hands to the repository. The worker computes every number; these records only refuse values that
# cannot be right, so a bug upstream fails loudly instead of landing in the analysts' views. The repository derives
# the sample row's summary columns from SampleSummary's fields (db.rows.summary_columns).

# Flags are stored comma-separated in one text column (db.models.Sample.flags).
FLAG_SEPARATOR = ","


def _check_probability(owner: str, field: str, value: float | None) -> None:
    # `not (0 <= x <= 1)` is also true for NaN, which SQLite would silently store as NULL.
    if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{owner}.{field}={value!r} must be a number in [0, 1] or None")


LYMPHOID = "lymphoid"
CELL_KINDS = (LYMPHOID, "other")


@dataclass(frozen=True, slots=True)
class FieldCell:
    """Where a cell found in a microscope field lies, and what it is (core.segment found it)."""

    field_uri: str
    cell_index: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in field pixels (x1, y1 exclusive)
    centroid: tuple[float, float]  # x, y in field pixels
    area_um2: float
    cell_kind: str
    edge: bool
    um_per_px: float
    scale_source: str
    outline: str  # JSON [[x, y], ...] in field pixels

    def __post_init__(self) -> None:
        if self.cell_kind not in CELL_KINDS:
            raise ValueError(f"FieldCell.cell_kind={self.cell_kind!r} must be one of {CELL_KINDS}")

    @property
    def scored(self) -> bool:
        """Whether the cell goes to the model: a whole lymphoid cell (edge and `other` cells are only counted)."""
        return self.cell_kind == LYMPHOID and not self.edge


@dataclass(frozen=True, slots=True)
class CellResult:
    """The outcome for one image or one cell of a field: a probability and call, or the error that kept it
    from being scored. A field's `other` and edge cells have neither: they are counted, not scored."""

    image_uri: str
    p_all: float | None
    is_all: bool | None
    error: str | None = None
    field: FieldCell | None = None

    def __post_init__(self) -> None:
        if not self.image_uri:
            raise ValueError("CellResult.image_uri must not be empty")
        _check_probability("CellResult", "p_all", self.p_all)

    @property
    def counted(self) -> bool:
        """Whether the row counts in n_cells: every image, every unreadable field, every whole lymphoid cell."""
        return self.field is None or self.field.scored


@dataclass(frozen=True, slots=True)
class FieldRecord:
    """One field of a field sample as the worker read it: its scale and what was found in it, or why it could not
    be read. A field with no white cell is a record with n_found 0 (not an error), so reviewers still see it."""

    field_uri: str
    field_index: int
    um_per_px: float | None = None
    scale_source: str | None = None
    n_found: int = 0
    n_scored: int = 0
    n_other: int = 0
    n_edge: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.field_uri:
            raise ValueError("FieldRecord.field_uri must not be empty")
        if min(self.field_index, self.n_found, self.n_scored, self.n_other, self.n_edge) < 0:
            raise ValueError(f"FieldRecord counts must be non-negative, got {self}")
        if self.n_scored + self.n_other + self.n_edge > self.n_found:
            raise ValueError(f"FieldRecord: scored + other + edge cells exceed the cells found, got {self}")


@dataclass(frozen=True, slots=True)
class SampleSummary:
    """The per-sample numbers; fractions are over the scored cells (n_cells - n_failed)."""

    n_cells: int
    n_all: int
    n_failed: int
    all_fraction: float | None
    ci_low: float | None
    ci_high: float | None
    corrected_fraction: float | None
    mean_p_all: float | None
    flags: tuple[str, ...] = ()
    # Field samples only (None for single-cell samples).
    n_fields: int | None = None
    n_fields_failed: int | None = None
    n_other: int | None = None
    n_edge: int | None = None
    um_per_px: float | None = None
    scale_source: str | None = None

    def __post_init__(self) -> None:
        if min(self.n_cells, self.n_all, self.n_failed) < 0:
            raise ValueError(f"SampleSummary counts must be non-negative, got {self}")
        if self.n_all + self.n_failed > self.n_cells:
            raise ValueError(
                f"SampleSummary.n_all={self.n_all} plus n_failed={self.n_failed} exceeds n_cells={self.n_cells}"
            )
        for field in ("all_fraction", "ci_low", "ci_high", "corrected_fraction", "mean_p_all"):
            _check_probability("SampleSummary", field, getattr(self, field))
        for flag in self.flags:
            if not flag or FLAG_SEPARATOR in flag or flag != flag.strip():
                raise ValueError(
                    f"SampleSummary flag {flag!r} must be a non-empty name without "
                    f"{FLAG_SEPARATOR!r} or surrounding spaces"
                )

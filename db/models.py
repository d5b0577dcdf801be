"""The tables behind the analyst views. Their shape is private: analysts read the views (db/views.py).

Every change here needs a migration in db/migrations/versions; a test compares the two.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    Double,
    Enum,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.coltypes import UtcDateTime

SAMPLE_ID_MAX_LENGTH = 128
JOB_ID_MAX_LENGTH = 128
MODEL_VERSION_MAX_LENGTH = 256  # "name:version"


class SampleStatus(enum.StrEnum):
    """Where a sample is on its way: queued -> running -> done, failed or cancelled (the three that end it)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A sample in one of these has ended: no delivery writes to it again (db.repository).
ENDED = (SampleStatus.DONE, SampleStatus.FAILED, SampleStatus.CANCELLED)


class Base(DeclarativeBase):
    """Declarative base of the allscore tables."""


class Model(Base):
    """A model version that scored samples, with the validation figures the correction used."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(128))
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    sensitivity: Mapped[float | None] = mapped_column(Double)
    specificity: Mapped[float | None] = mapped_column(Double)
    threshold: Mapped[float] = mapped_column(Double)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Job(Base):
    """One submission: a batch of samples under an id the submitter chose (a uuid by default)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(JOB_ID_MAX_LENGTH), primary_key=True)
    submitted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    n_samples: Mapped[int] = mapped_column(Integer)
    # Completion callback (migration 0009): POST the job's summary here once every sample has ended.
    notify_url: Mapped[str | None] = mapped_column(Text)
    # When a worker claimed the notification (at most one per job), and what came of it.
    notified_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    notify_status: Mapped[str | None] = mapped_column(Text)


class Sample(Base):
    """One result set: a sample scored by one model version; the summary is null until done."""

    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("sample_id", "model_version", name="uq_samples_sample_id_model_version"),
        CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="ck_samples_status"),
        Index("ix_samples_job_id", "job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[str] = mapped_column(String(SAMPLE_ID_MAX_LENGTH))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", name="fk_samples_job_id_jobs"))
    model_version: Mapped[str] = mapped_column(String(MODEL_VERSION_MAX_LENGTH))
    # Stored as text with a CHECK, not a native enum: a new status then needs no ALTER TYPE,
    # and SQLite has no enums.
    status: Mapped[SampleStatus] = mapped_column(
        Enum(
            SampleStatus,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda members: [m.value for m in members],
        )
    )
    n_cells: Mapped[int | None] = mapped_column(Integer)
    n_all: Mapped[int | None] = mapped_column(Integer)
    n_failed: Mapped[int | None] = mapped_column(Integer)
    all_fraction: Mapped[float | None] = mapped_column(Double)
    ci_low: Mapped[float | None] = mapped_column(Double)
    ci_high: Mapped[float | None] = mapped_column(Double)
    corrected_fraction: Mapped[float | None] = mapped_column(Double)
    mean_p_all: Mapped[float | None] = mapped_column(Double)
    # Comma-separated flag names ("over_5pct,over_20pct"); '' once done with none, null before.
    # Plain text reads the same in every SQL client: flags LIKE '%over_20pct%'.
    flags: Mapped[str | None] = mapped_column(Text)
    submitted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    error: Mapped[str | None] = mapped_column(Text)
    # Times a worker started on this sample since it was (re)submitted; >1 means redelivery or retry.
    attempts: Mapped[int] = mapped_column(Integer)
    # The fencing token: bumped by every (re)submission. A delivery writes only while its message's
    # (job_id, submission) is the row's, so a stale one never touches a newer result (core.contract).
    submission: Mapped[int] = mapped_column(Integer, server_default="1")
    # 'cells' (single-cell crops) or 'fields' (microscope fields, cut into cells by the worker).
    kind: Mapped[str] = mapped_column(String(16), server_default="cells")
    # Field samples only: fields read, fields that could not be read, `other` (non-lymphoid) cells and cells
    # cut by a field's edge (both found and counted, not scored), and the scale of the fields (median).
    n_fields: Mapped[int | None] = mapped_column(Integer)
    n_fields_failed: Mapped[int | None] = mapped_column(Integer)
    n_other: Mapped[int | None] = mapped_column(Integer)
    n_edge: Mapped[int | None] = mapped_column(Integer)
    um_per_px: Mapped[float | None] = mapped_column(Double)
    scale_source: Mapped[str | None] = mapped_column(String(16))


class Cell(Base):
    """One image's result within a sample result set; keyed by image so a rewrite cannot duplicate it."""

    __tablename__ = "cells"
    __table_args__ = (
        ForeignKeyConstraint(["sample_pk"], ["samples.id"], name="fk_cells_sample_pk_samples", ondelete="CASCADE"),
    )

    # The primary key is the natural key, so no extra index or sequence slows bulk inserts.
    sample_pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_uri: Mapped[str] = mapped_column(Text, primary_key=True)
    p_all: Mapped[float | None] = mapped_column(Double)
    is_all: Mapped[bool | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    scored_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # A cell found in a field: image_uri is the field's URI + '#cell=N'; where it is, what it is.
    field_uri: Mapped[str | None] = mapped_column(Text)
    cell_index: Mapped[int | None] = mapped_column(Integer)
    bbox_x0: Mapped[int | None] = mapped_column(Integer)
    bbox_y0: Mapped[int | None] = mapped_column(Integer)
    bbox_x1: Mapped[int | None] = mapped_column(Integer)
    bbox_y1: Mapped[int | None] = mapped_column(Integer)
    centroid_x: Mapped[float | None] = mapped_column(Double)
    centroid_y: Mapped[float | None] = mapped_column(Double)
    area_um2: Mapped[float | None] = mapped_column(Double)
    cell_kind: Mapped[str | None] = mapped_column(String(16))
    edge: Mapped[bool | None] = mapped_column()
    um_per_px: Mapped[float | None] = mapped_column(Double)
    scale_source: Mapped[str | None] = mapped_column(String(16))
    # The cell's outline in field pixels, as JSON [[x, y], ...], for the review overlays.
    outline: Mapped[str | None] = mapped_column(Text)


class SampleFieldRow(Base):
    """One field of a field sample (migration 0010): its scale and what was found in it, or why it could not be
    read; a field with no white cell is a row too (n_found 0), so its overlay can still be drawn and reviewed."""

    __tablename__ = "sample_fields"
    __table_args__ = (
        ForeignKeyConstraint(
            ["sample_pk"], ["samples.id"], name="fk_sample_fields_sample_pk_samples", ondelete="CASCADE"
        ),
    )

    sample_pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    field_uri: Mapped[str] = mapped_column(Text, primary_key=True)
    field_index: Mapped[int] = mapped_column(Integer)
    um_per_px: Mapped[float | None] = mapped_column(Double)
    scale_source: Mapped[str | None] = mapped_column(String(16))
    # White cells found (every kind, edge or not), whole lymphoid cells scored, `other` cells, lymphoid cells cut
    # by the field's edge.
    n_found: Mapped[int] = mapped_column(Integer)
    n_scored: Mapped[int] = mapped_column(Integer)
    n_other: Mapped[int] = mapped_column(Integer)
    n_edge: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


# --- Review (migration 0006): what a reviewer says about a result; never a change to the result itself ---------

CORRECTED_CLASSES = ("all", "hem", "other", "not_a_cell")
REVIEWER_NAME_MAX_LENGTH = 64


class ReviewUser(Base):
    """A person who may log in to `allscore review`; `can_write` False is a read-only user."""

    __tablename__ = "review_users"
    __table_args__ = (UniqueConstraint("name", name="uq_review_users_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(REVIEWER_NAME_MAX_LENGTH))
    # hashlib.scrypt, "scrypt$n$r$p$salt_hex$hash_hex" (allscore/review/auth.py).
    password_hash: Mapped[str] = mapped_column(Text)
    can_write: Mapped[bool] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class CellVerdict(Base):
    """A reviewer's verdict on one cell's call, keyed by what the cell is (sample, image, model version) and not
    by a result row, so a re-score of the same sample keeps it."""

    __tablename__ = "cell_verdicts"
    __table_args__ = (
        CheckConstraint(
            "corrected_class IS NULL OR corrected_class IN ('all', 'hem', 'other', 'not_a_cell')",
            name="ck_cell_verdicts_corrected_class",
        ),
        CheckConstraint(
            "(agree AND corrected_class IS NULL) OR (NOT agree AND corrected_class IS NOT NULL)",
            name="ck_cell_verdicts_agree_or_corrected",
        ),
    )

    sample_id: Mapped[str] = mapped_column(String(SAMPLE_ID_MAX_LENGTH), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(MODEL_VERSION_MAX_LENGTH), primary_key=True)
    image_uri: Mapped[str] = mapped_column(Text, primary_key=True)
    agree: Mapped[bool] = mapped_column()
    corrected_class: Mapped[str | None] = mapped_column(String(16))
    reviewer: Mapped[str] = mapped_column(String(REVIEWER_NAME_MAX_LENGTH))
    reviewed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SampleSignoff(Base):
    """A reviewer's sign-off of one sample's result (one model version), with a comment."""

    __tablename__ = "sample_signoffs"

    sample_id: Mapped[str] = mapped_column(String(SAMPLE_ID_MAX_LENGTH), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(MODEL_VERSION_MAX_LENGTH), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(REVIEWER_NAME_MAX_LENGTH))
    comment: Mapped[str] = mapped_column(Text)
    signed_at: Mapped[datetime] = mapped_column(UtcDateTime)

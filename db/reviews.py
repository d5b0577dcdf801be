"""Review records: reviewers, their verdicts on cells and their sign-offs, and the view sample_reviews.

Like db.repository, nothing here commits: the caller owns the transaction (db.engine.transaction).
A verdict is keyed by (sample_id, model_version, image_uri), the cell's identity, and never edits a result row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Double, Integer, MetaData, String, Table, Text, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.errors import AllscoreError
from db.coltypes import UtcDateTime, utcnow
from db.models import (
    CORRECTED_CLASSES,
    REVIEWER_NAME_MAX_LENGTH,
    CellVerdict,
    ReviewUser,
    SampleSignoff,
)
from db.views import cell_results

review_view_metadata = MetaData()

# One row per sample result (the view is created by migration 0006).
sample_reviews = Table(
    "sample_reviews",
    review_view_metadata,
    Column("sample_id", String),
    Column("model_version", String),
    Column("n_scored", Integer),
    Column("n_reviewed", Integer),
    Column("n_agree", Integer),
    Column("n_disagree", Integer),
    Column("n_all_reviewed", Integer),
    Column("n_excluded", Integer),
    Column("reviewed_fraction", Double),
    Column("last_reviewed_at", UtcDateTime),
    Column("signed_off_by", String),
    Column("signed_off_at", UtcDateTime),
    Column("sign_off_comment", Text),
)

SAMPLE_REVIEWS_COLUMNS = [c.name for c in sample_reviews.columns]


class ReviewError(AllscoreError):
    """A verdict, sign-off or user that cannot be recorded as given."""


@dataclass(frozen=True, slots=True)
class Reviewer:
    """A user of the review app as the app sees it (no password hash)."""

    name: str
    can_write: bool


def _upsert(session: Session, entity: type[Any]) -> postgresql.Insert | sqlite.Insert:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(entity)
    return sqlite.insert(entity)


def check_user_name(name: str) -> str:
    """A user name: 1-64 printable characters without spaces at the ends."""
    if not name or name != name.strip() or len(name) > REVIEWER_NAME_MAX_LENGTH or not name.isprintable():
        raise ReviewError(f"user name {name!r}: use 1-{REVIEWER_NAME_MAX_LENGTH} printable characters")
    return name


def add_user(*, session: Session, name: str, password_hash: str, can_write: bool, replace: bool = False) -> None:
    """Add a user (or, with `replace`, set an existing user's password and rights)."""
    check_user_name(name)
    existing = session.execute(select(ReviewUser).where(ReviewUser.name == name)).scalar_one_or_none()
    if existing is not None and not replace:
        raise ReviewError(f"user {name!r} exists already; pass --replace to set a new password")
    if existing is None:
        session.add(ReviewUser(name=name, password_hash=password_hash, can_write=can_write, created_at=utcnow()))
    else:
        existing.password_hash = password_hash
        existing.can_write = can_write
    session.flush()


def get_user(*, session: Session, name: str) -> tuple[Reviewer, str] | None:
    """The user and their password hash, or None."""
    row = session.execute(
        select(ReviewUser.name, ReviewUser.can_write, ReviewUser.password_hash).where(ReviewUser.name == name)
    ).one_or_none()
    if row is None:
        return None
    return Reviewer(row.name, bool(row.can_write)), row.password_hash


def cell_row(session: Session, sample_id: str, model_version: str, image_uri: str) -> dict[str, Any] | None:
    """One row of the view cell_results (a cell of that sample and model version), or None."""
    row = session.execute(
        select(cell_results).where(
            cell_results.c.sample_id == sample_id,
            cell_results.c.model_version == model_version,
            cell_results.c.image_uri == image_uri,
        )
    ).one_or_none()
    return None if row is None else dict(row._mapping)


def _scored_cell(session: Session, sample_id: str, model_version: str, image_uri: str) -> dict[str, Any]:
    row = cell_row(session, sample_id, model_version, image_uri)
    if row is None or row["p_all"] is None:
        raise ReviewError(f"sample {sample_id!r} ({model_version}) has no scored cell {image_uri!r}")
    return row


def record_verdict(
    *,
    session: Session,
    sample_id: str,
    model_version: str,
    image_uri: str,
    agree: bool,
    corrected_class: str | None,
    reviewer: str,
) -> None:
    """Record (or replace) a reviewer's verdict on one scored cell's call."""
    cell = _scored_cell(session, sample_id, model_version, image_uri)
    if agree:
        corrected_class = None
    else:
        if corrected_class not in CORRECTED_CLASSES:
            raise ReviewError(f"a disagreeing verdict needs a corrected class, one of {', '.join(CORRECTED_CLASSES)}")
        call = "all" if cell["is_all"] else "hem"
        if corrected_class == call:
            raise ReviewError(f"the model called this cell {call}: a correction to {call} is an agreement")
    values = {"agree": agree, "corrected_class": corrected_class, "reviewer": reviewer, "reviewed_at": utcnow()}
    stmt = (
        _upsert(session, CellVerdict)
        .values(sample_id=sample_id, model_version=model_version, image_uri=image_uri, **values)
        .on_conflict_do_update(index_elements=["sample_id", "model_version", "image_uri"], set_=values)
    )
    session.execute(stmt)


def clear_verdict(*, session: Session, sample_id: str, model_version: str, image_uri: str) -> None:
    """Remove a verdict (the cell is unreviewed again)."""
    session.execute(
        delete(CellVerdict).where(
            CellVerdict.sample_id == sample_id,
            CellVerdict.model_version == model_version,
            CellVerdict.image_uri == image_uri,
        )
    )


def verdicts(*, session: Session, sample_id: str, model_version: str) -> dict[str, dict[str, Any]]:
    """image_uri -> verdict (agree, corrected_class, reviewer, reviewed_at) for one sample result."""
    rows = session.execute(
        select(
            CellVerdict.image_uri,
            CellVerdict.agree,
            CellVerdict.corrected_class,
            CellVerdict.reviewer,
            CellVerdict.reviewed_at,
        ).where(CellVerdict.sample_id == sample_id, CellVerdict.model_version == model_version)
    )
    return {row.image_uri: dict(row._mapping) for row in rows}


def sign_off(*, session: Session, sample_id: str, model_version: str, reviewer: str, comment: str) -> None:
    """Sign a sample result off (again: the newest sign-off is the one kept)."""
    exists = session.execute(
        select(cell_results.c.sample_id)
        .where(cell_results.c.sample_id == sample_id, cell_results.c.model_version == model_version)
        .limit(1)
    ).first()
    if exists is None:
        raise ReviewError(f"sample {sample_id!r} has no scored result for model {model_version!r} to sign off")
    values = {"reviewer": reviewer, "comment": comment, "signed_at": utcnow()}
    stmt = (
        _upsert(session, SampleSignoff)
        .values(sample_id=sample_id, model_version=model_version, **values)
        .on_conflict_do_update(index_elements=["sample_id", "model_version"], set_=values)
    )
    session.execute(stmt)


def get_sample_reviews(
    *, session: Session, sample_ids: Sequence[str] | None = None, model_version: str | None = None
) -> list[dict[str, Any]]:
    """Rows of the view sample_reviews, optionally for some samples and one model version."""
    stmt = select(sample_reviews)
    if sample_ids is not None:
        stmt = stmt.where(sample_reviews.c.sample_id.in_(list(sample_ids)))
    if model_version is not None:
        stmt = stmt.where(sample_reviews.c.model_version == model_version)
    stmt = stmt.order_by(sample_reviews.c.sample_id, sample_reviews.c.model_version)
    return [dict(row._mapping) for row in session.execute(stmt)]


@dataclass(frozen=True, slots=True)
class ReviewedCell:
    """A reviewed cell with the class the reviewer gave it (their correction, or the model's call agreed)."""

    sample_id: str
    model_version: str
    image_uri: str
    final_class: str
    reviewer: str
    reviewed_at: datetime
    field_uri: str | None
    bbox: tuple[int, int, int, int] | None


def reviewed_cells(*, session: Session, since: datetime | None = None) -> list[ReviewedCell]:
    """Every reviewed scored cell (optionally reviewed at or after `since`), with its reviewer's class."""
    stmt = (
        select(
            cell_results, CellVerdict.agree, CellVerdict.corrected_class, CellVerdict.reviewer, CellVerdict.reviewed_at
        )
        .join(
            CellVerdict,
            (CellVerdict.sample_id == cell_results.c.sample_id)
            & (CellVerdict.model_version == cell_results.c.model_version)
            & (CellVerdict.image_uri == cell_results.c.image_uri),
        )
        .where(cell_results.c.p_all.is_not(None))
        .order_by(cell_results.c.sample_id, cell_results.c.model_version, cell_results.c.image_uri)
    )
    if since is not None:
        stmt = stmt.where(CellVerdict.reviewed_at >= since)
    out = []
    for row in session.execute(stmt):
        final = ("all" if row.is_all else "hem") if row.agree else str(row.corrected_class)
        bbox = None
        if row.field_uri is not None:
            bbox = (int(row.bbox_x0), int(row.bbox_y0), int(row.bbox_x1), int(row.bbox_y1))
        out.append(
            ReviewedCell(
                sample_id=row.sample_id,
                model_version=row.model_version,
                image_uri=row.image_uri,
                final_class=final,
                reviewer=row.reviewer,
                reviewed_at=row.reviewed_at,
                field_uri=row.field_uri,
                bbox=bbox,
            )
        )
    return out

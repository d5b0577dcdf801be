"""What the review pages read: the analyst views (sample_results, cell_results), sample_reviews, model thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from db.models import Model
from db.reviews import cell_row, sample_reviews
from db.views import cell_results, field_results, sample_results

PAGE_SIZE = 25
SORTS = {
    "fraction_desc": (sample_results.c.all_fraction.desc().nulls_last(),),
    "fraction_asc": (sample_results.c.all_fraction.asc().nulls_last(),),
    "newest": (sample_results.c.submitted_at.desc(),),
    "sample": (sample_results.c.sample_id.asc(),),
}
REVIEW_STATES = ("unreviewed", "in review", "signed off")


@dataclass(frozen=True)
class SampleFilter:
    """The samples page's filters, as given in the query string ('' = any)."""

    flag: str = ""
    status: str = ""
    job: str = ""
    model: str = ""
    date_from: str = ""
    date_to: str = ""
    sort: str = "fraction_desc"
    page: int = 1

    @classmethod
    def from_query(cls, query: Any) -> SampleFilter:
        def text(name: str) -> str:
            return str(query.get(name, "") or "").strip()

        try:
            page = max(1, int(text("page") or 1))
        except ValueError:
            page = 1
        sort = text("sort") or "fraction_desc"
        return cls(
            flag=text("flag"),
            status=text("status"),
            job=text("job"),
            model=text("model"),
            date_from=text("from"),
            date_to=text("to"),
            sort=sort if sort in SORTS else "fraction_desc",
            page=page,
        )

    def query(self, **override: Any) -> dict[str, str]:
        """The filter as query parameters (for links), with some replaced."""
        values = {
            "flag": self.flag,
            "status": self.status,
            "job": self.job,
            "model": self.model,
            "from": self.date_from,
            "to": self.date_to,
            "sort": self.sort,
            "page": str(self.page),
            **{k: str(v) for k, v in override.items()},
        }
        return {k: v for k, v in values.items() if v}


def _day(text: str) -> datetime | None:
    try:
        return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
    except ValueError:
        return None


@dataclass
class SamplePage:
    rows: list[dict[str, Any]]
    total: int
    pages: int


def list_samples(session: Session, f: SampleFilter) -> SamplePage:
    """One page of sample results with their review state, filtered and sorted."""
    conditions = []
    if f.flag == "any":
        conditions.append(and_(sample_results.c.flags.is_not(None), sample_results.c.flags != ""))
    elif f.flag == "none":
        conditions.append(sample_results.c.flags == "")
    elif f.flag:
        # Flags are stored comma-separated; match a whole name.
        padded = "," + sample_results.c.flags + ","
        conditions.append(padded.contains(f",{f.flag},", autoescape=True))
    if f.status:
        conditions.append(sample_results.c.status == f.status)
    if f.job:
        conditions.append(sample_results.c.job_id == f.job)
    if f.model:
        conditions.append(sample_results.c.model_version == f.model)
    start, end = _day(f.date_from), _day(f.date_to)
    if start is not None:
        conditions.append(sample_results.c.submitted_at >= start)
    if end is not None:
        conditions.append(sample_results.c.submitted_at < end + timedelta(days=1))
    joined = sample_results.outerjoin(
        sample_reviews,
        and_(
            sample_reviews.c.sample_id == sample_results.c.sample_id,
            sample_reviews.c.model_version == sample_results.c.model_version,
        ),
    )
    total = session.execute(select(func.count()).select_from(sample_results).where(*conditions)).scalar_one()
    pages = max(1, math.ceil(total / PAGE_SIZE))
    stmt = (
        select(
            sample_results,
            sample_reviews.c.n_reviewed,
            sample_reviews.c.n_scored,
            sample_reviews.c.reviewed_fraction,
            sample_reviews.c.signed_off_by,
            sample_reviews.c.signed_off_at,
        )
        .select_from(joined)
        .where(*conditions)
        .order_by(*SORTS[f.sort], sample_results.c.sample_id, sample_results.c.model_version)
        .limit(PAGE_SIZE)
        .offset((min(f.page, pages) - 1) * PAGE_SIZE)
    )
    rows = [with_review_state(dict(row._mapping)) for row in session.execute(stmt)]
    return SamplePage(rows=rows, total=int(total), pages=pages)


def with_review_state(row: dict[str, Any]) -> dict[str, Any]:
    """The row with `review_state`: signed off, in review (some verdicts) or unreviewed."""
    if row.get("signed_off_by"):
        row["review_state"] = "signed off"
    elif row.get("n_reviewed"):
        row["review_state"] = "in review"
    else:
        row["review_state"] = "unreviewed"
    return row


def filter_choices(session: Session) -> dict[str, list[str]]:
    """The values the filter menus offer."""
    flags: set[str] = set()
    for (text,) in session.execute(select(sample_results.c.flags).distinct()):
        flags.update(name for name in (text or "").split(",") if name)
    models = [m for (m,) in session.execute(select(sample_results.c.model_version).distinct()) if m]
    statuses = [s for (s,) in session.execute(select(sample_results.c.status).distinct()) if s]
    return {"flags": sorted(flags), "models": sorted(models), "statuses": sorted(statuses)}


def sample_result(session: Session, sample_id: str, model_version: str | None) -> dict[str, Any] | None:
    """One sample result (the newest submission when no model version is given), with its review row."""
    stmt = select(sample_results).where(sample_results.c.sample_id == sample_id)
    if model_version:
        stmt = stmt.where(sample_results.c.model_version == model_version)
    row = session.execute(stmt.order_by(sample_results.c.submitted_at.desc()).limit(1)).one_or_none()
    if row is None:
        return None
    out = dict(row._mapping)
    review = session.execute(
        select(sample_reviews).where(
            sample_reviews.c.sample_id == sample_id, sample_reviews.c.model_version == out["model_version"]
        )
    ).one_or_none()
    out["review"] = dict(review._mapping) if review is not None else {}
    out.update({k: v for k, v in out["review"].items() if k not in out})
    return with_review_state(out)


def other_versions(session: Session, sample_id: str, model_version: str) -> list[dict[str, Any]]:
    """The same sample's results under other model versions."""
    stmt = (
        select(sample_results)
        .where(sample_results.c.sample_id == sample_id, sample_results.c.model_version != model_version)
        .order_by(sample_results.c.model_version)
    )
    return [dict(row._mapping) for row in session.execute(stmt)]


def cells(session: Session, sample_id: str, model_version: str) -> list[dict[str, Any]]:
    """Every cell row of one sample result."""
    stmt = select(cell_results).where(
        cell_results.c.sample_id == sample_id, cell_results.c.model_version == model_version
    )
    return [dict(row._mapping) for row in session.execute(stmt)]


def fields(session: Session, sample_id: str, model_version: str) -> list[dict[str, Any]]:
    """Every field row of one field sample result (view field_results), in the order submitted."""
    stmt = (
        select(field_results)
        .where(field_results.c.sample_id == sample_id, field_results.c.model_version == model_version)
        .order_by(field_results.c.field_index)
    )
    return [dict(row._mapping) for row in session.execute(stmt)]


def cell(session: Session, sample_id: str, model_version: str, image_uri: str) -> dict[str, Any] | None:
    """One cell row, or None: the thumbnail route serves only URIs that are cells of the sample named."""
    return cell_row(session, sample_id, model_version, image_uri)


def threshold(session: Session, model_version: str) -> float | None:
    """The decision threshold the model version scored with (models table), if registered."""
    name, _, version = model_version.partition(":")
    return session.execute(
        select(Model.threshold).where(Model.name == name, Model.version == version)
    ).scalar_one_or_none()

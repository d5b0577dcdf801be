"""Database scenarios (oracles): each takes a session factory and runs unchanged on SQLite (tests/unit) and on
PostgreSQL (tests/integration). The lists at the end are what the tests parametrize over."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from core.contract import CellResult, SampleSummary
from db import errors, reviews
from db import repository as repo
from db.engine import transaction
from db.models import Sample
from tests.harness.db import (
    Factory,
    as_rows,
    cell_set,
    cells_of,
    make_cells,
    register_model,
    results,
    score,
    submit,
    summarize,
    table_counts,
)

Scenario = Callable[[Factory], None]

# --- samples and results ------------------------------------------------------------------------------------


def a_sample_goes_queued_running_done_or_failed_in_the_views(factory: Factory) -> None:
    """queued -> running -> done (and failed) as seen through the views."""
    submit(factory, "job-1", ["S1", "S2"])
    queued = results(factory, job_id="job-1")
    assert [(r["sample_id"], r["status"]) for r in queued] == [("S1", "queued"), ("S2", "queued")]
    assert all(r["n_cells"] is None and r["started_at"] is None for r in queued)

    with transaction(factory) as s:
        assert repo.mark_running(session=s, sample_id="S1", model_version="cnn:1") == 1
    (running,) = results(factory, sample_ids=["S1"])
    assert running["status"] == "running"
    assert isinstance(running["started_at"], datetime)
    assert running["started_at"].tzinfo is not None

    cells = make_cells("s3://lab/S1", [0.9, 0.2, None, 0.7, 0.4, 0.55, None, 0.01])
    with transaction(factory) as s:
        repo.record_sample_result(
            session=s, sample_id="S1", model_version="cnn:1", cells=cells, summary=summarize(cells)
        )
    (done,) = results(factory, sample_ids=["S1"])
    expected = summarize(cells)
    assert done["status"] == "done"
    assert (done["n_cells"], done["n_all"], done["n_failed"]) == (len(cells), 3, 2)
    assert done["all_fraction"] == pytest.approx(expected.all_fraction)
    assert done["mean_p_all"] == pytest.approx(expected.mean_p_all)
    assert done["flags"] == ",".join(expected.flags)
    assert done["error"] is None
    assert done["submitted_at"] <= done["started_at"] <= done["finished_at"]

    view_cells = cells_of(factory, "S1")
    assert len(view_cells) == len(cells)
    assert cell_set(view_cells) == as_rows(cells)
    assert all(r["model_version"] == "cnn:1" and r["sample_id"] == "S1" for r in view_cells)
    failed_cells = [r for r in view_cells if r["error"] is not None]
    assert len(failed_cells) == done["n_failed"]
    assert all(r["p_all"] is None and r["is_all"] is None for r in failed_cells)

    with transaction(factory) as s:
        repo.mark_running(session=s, sample_id="S2", model_version="cnn:1")
        repo.mark_failed(session=s, sample_id="S2", model_version="cnn:1", error="S3 unreachable after 5 tries")
    (failed,) = results(factory, sample_ids="S2")
    assert failed["status"] == "failed"
    assert failed["error"] == "S3 unreachable after 5 tries"
    assert failed["finished_at"] is not None and failed["n_cells"] is None
    assert cells_of(factory, "S2") == []
    with transaction(factory) as s:
        assert repo.get_sample_status(session=s, sample_id="S2", model_version="cnn:1") == "failed"
        assert repo.get_sample_status(session=s, sample_id="S3", model_version="cnn:1") is None


def resubmitting_replaces_the_result_and_a_new_version_adds_one(factory: Factory) -> None:
    """Same sample+version replaces its result; another version adds a second result set."""
    submit(factory, "job-a", ["S1"])
    first = make_cells("s3://lab/S1", [0.9, 0.8, 0.1])
    score(factory, "S1", "cnn:1", first)
    score(factory, "S1", "cnn:1", first)  # a redelivered task writes the same result again
    assert len(cells_of(factory, "S1")) == len(first)

    with transaction(factory) as s:
        pk_before = s.execute(select(Sample.id).where(Sample.sample_id == "S1")).scalar_one()
        repo.create_job(session=s, job_id="job-b", n_samples=1)
        again = repo.enqueue_sample(session=s, job_id="job-b", sample_id="S1", model_version="cnn:1")
    assert (again.pk, again.submission) == (pk_before, 2)
    (requeued,) = results(factory, sample_ids=["S1"])
    assert (requeued["status"], requeued["job_id"], requeued["n_cells"]) == ("queued", "job-b", None)
    assert cells_of(factory, "S1") == [], "a queued sample must not show the previous result's cells"

    # The new set shares one image with the old one and drops two.
    second = make_cells("s3://lab/S1", [0.3, 0.6]) + make_cells("s3://lab/S1-extra", [0.95])
    score(factory, "S1", "cnn:1", second)
    rows = results(factory, sample_ids=["S1"])
    assert len(rows) == 1
    assert rows[0]["n_cells"] == len(second)
    assert cell_set(cells_of(factory, "S1")) == as_rows(second)

    submit(factory, "job-c", ["S1"], model_version="cnn:2")
    other = make_cells("s3://lab/S1", [0.1, 0.1, 0.1, 0.9])
    score(factory, "S1", "cnn:2", other)
    rows = results(factory, sample_ids=["S1"])
    assert [(r["model_version"], r["n_cells"]) for r in rows] == [
        ("cnn:1", len(second)),
        ("cnn:2", len(other)),
    ]
    assert len(cells_of(factory, "S1")) == len(second) + len(other)
    assert cell_set(cells_of(factory, "S1", "cnn:2")) == as_rows(other)
    assert cell_set(cells_of(factory, "S1", "cnn:1")) == as_rows(second)


def repository_functions_leave_committing_to_the_caller(factory: Factory) -> None:
    """A rollback after every repository function leaves the database as it was."""
    before = table_counts(factory)
    with factory() as s:
        register_model(s)
        repo.create_job(session=s, job_id="job-x", n_samples=1)
        repo.enqueue_sample(session=s, job_id="job-x", sample_id="S9", model_version="cnn:1")
        repo.mark_running(session=s, sample_id="S9", model_version="cnn:1")
        cells = make_cells("s3://lab/S9", [0.9, None])
        repo.record_sample_result(
            session=s, sample_id="S9", model_version="cnn:1", cells=cells, summary=summarize(cells)
        )
        assert len(repo.get_cell_results(session=s, sample_id="S9")) == 2, "visible inside the transaction"
        s.rollback()
    assert table_counts(factory) == before
    assert results(factory, sample_ids=["S9"]) == []
    assert cells_of(factory, "S9") == []


def mistakes_get_typed_errors_and_the_transaction_stays_usable(factory: Factory) -> None:
    """Mistakes a caller can make get typed errors, and the transaction stays usable after them."""
    with transaction(factory) as s:
        repo.create_job(session=s, job_id="job-e", n_samples=1)
        with pytest.raises(errors.JobExistsError, match="job-e"):
            repo.create_job(session=s, job_id="job-e", n_samples=1)
        with pytest.raises(errors.JobNotFoundError, match="nope"):
            repo.enqueue_sample(session=s, job_id="nope", sample_id="S1", model_version="cnn:1")
        with pytest.raises(errors.SampleNotFoundError, match="ghost"):
            repo.mark_running(session=s, sample_id="ghost", model_version="cnn:1")
        with pytest.raises(errors.SampleNotFoundError, match="ghost"):
            repo.mark_failed(session=s, sample_id="ghost", model_version="cnn:1", error="x")
        for bad in ("", "x" * 129, "bad\nid", "tab\tid", " padded"):
            with pytest.raises(errors.InvalidIdentifierError):
                repo.enqueue_sample(session=s, job_id="job-e", sample_id=bad, model_version="cnn:1")
        repo.enqueue_sample(session=s, job_id="job-e", sample_id="x" * 128, model_version="cnn:1")

        repo.enqueue_sample(session=s, job_id="job-e", sample_id="S1", model_version="cnn:1")
        cells = make_cells("s3://lab/S1", [0.9, None])
        with pytest.raises(errors.ResultMismatchError, match="n_cells"):
            repo.record_sample_result(
                session=s, sample_id="S1", model_version="cnn:1", cells=cells[:1], summary=summarize(cells)
            )
        with pytest.raises(errors.ResultMismatchError, match="twice"):
            doubled = [cells[0], cells[0]]
            repo.record_sample_result(
                session=s, sample_id="S1", model_version="cnn:1", cells=doubled, summary=summarize(doubled)
            )

        model_id = register_model(s)
        assert register_model(s) == model_id
        assert register_model(s, version="2", sha256="b" * 64) != model_id
        with pytest.raises(errors.ModelConflictError, match="cnn:1"):
            register_model(s, sha256="c" * 64)
    # Everything that did not raise was committed: the errors did not poison the transaction.
    assert {r["sample_id"] for r in results(factory, job_id="job-e")} == {"S1", "x" * 128}
    assert table_counts(factory)["models"] == 2


# --- reviews: verdicts, sign-offs, sample_reviews ---------------------------------------------------

MODEL = "cnn:1"
# p(ALL) of sample S1's cells: 3 called ALL (>= 0.5), 4 normal, 1 unreadable.
PROBABILITIES: list[float | None] = [0.95, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, None]


def review_row(factory: Factory, sample_id: str = "S1", model_version: str = MODEL) -> dict[str, Any]:
    with transaction(factory) as s:
        (row,) = reviews.get_sample_reviews(session=s, sample_ids=[sample_id], model_version=model_version)
    return row


def verdict(factory: Factory, cell: CellResult, agree: bool, corrected: str | None, who: str = "ann") -> None:
    with transaction(factory) as s:
        reviews.record_verdict(
            session=s,
            sample_id="S1",
            model_version=MODEL,
            image_uri=cell.image_uri,
            agree=agree,
            corrected_class=corrected,
            reviewer=who,
        )


def scored_sample(factory: Factory) -> list[CellResult]:
    cells = make_cells("s3://lab/S1", PROBABILITIES)
    submit(factory, "job-r", ["S1"], MODEL)
    score(factory, "S1", MODEL, cells)
    return cells


def verdicts_correct_the_reviewed_fraction_and_a_sign_off_shows(factory: Factory) -> None:
    """The view counts verdicts and applies corrections the way a reviewer reads them."""
    cells = scored_sample(factory)
    before = review_row(factory)
    assert (before["n_scored"], before["n_reviewed"], before["signed_off_by"]) == (7, 0, None)
    assert before["reviewed_fraction"] == pytest.approx(3 / 7)  # no verdicts: the model's own fraction

    verdict(factory, cells[0], True, None)  # ALL, agreed
    verdict(factory, cells[1], False, "hem")  # ALL -> hem
    verdict(factory, cells[3], False, "all")  # hem -> ALL
    verdict(factory, cells[4], False, "not_a_cell")  # hem -> not counted
    verdict(factory, cells[5], False, "other")  # hem -> another kind, not counted
    row = review_row(factory)
    assert (row["n_reviewed"], row["n_agree"], row["n_disagree"], row["n_excluded"]) == (5, 1, 4, 2)
    # ALL after review: cells 0, 2, 3; counted: 7 scored - 2 excluded.
    assert row["n_all_reviewed"] == 3
    assert row["reviewed_fraction"] == pytest.approx(3 / 5)
    assert row["last_reviewed_at"] is not None and row["last_reviewed_at"].tzinfo is not None

    # A verdict replaced keeps one row per cell; the newest wins.
    verdict(factory, cells[1], True, None, who="bob")
    with transaction(factory) as s:
        stored = reviews.verdicts(session=s, sample_id="S1", model_version=MODEL)
    assert len(stored) == 5
    assert (stored[cells[1].image_uri]["agree"], stored[cells[1].image_uri]["reviewer"]) == (True, "bob")
    assert review_row(factory)["reviewed_fraction"] == pytest.approx(4 / 5)

    with transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S1", model_version=MODEL, reviewer="ann", comment="checked")
    row = review_row(factory)
    assert (row["signed_off_by"], row["sign_off_comment"]) == ("ann", "checked")
    assert row["signed_off_at"] is not None


def verdicts_and_sign_offs_survive_a_rescore(factory: Factory) -> None:
    """Verdicts are keyed by sample, image and model version: a re-score (new cell rows) keeps them."""
    cells = scored_sample(factory)
    verdict(factory, cells[0], False, "hem")
    with transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S1", model_version=MODEL, reviewer="ann", comment="")
    submit(factory, "job-r2", ["S1"], MODEL)  # resubmission: the old cell rows are deleted
    score(factory, "S1", MODEL, cells)
    row = review_row(factory)
    assert (row["n_reviewed"], row["n_disagree"], row["signed_off_by"]) == (1, 1, "ann")
    assert row["reviewed_fraction"] == pytest.approx(2 / 7)
    # Another model version's result of the same sample has its own (no) verdicts.
    submit(factory, "job-r3", ["S1"], "cnn:2")
    score(factory, "S1", "cnn:2", cells)
    assert review_row(factory, model_version="cnn:2")["n_reviewed"] == 0


def verdicts_only_on_scored_cells_with_a_meaningful_class(factory: Factory) -> None:
    """Verdicts only on scored cells of a real result, with a class that says something."""
    cells = scored_sample(factory)
    with pytest.raises(reviews.ReviewError, match="no scored cell"):
        verdict(factory, cells[7], True, None)  # the unreadable image has no call to review
    with pytest.raises(reviews.ReviewError, match="no scored cell"), transaction(factory) as s:
        reviews.record_verdict(
            session=s,
            sample_id="S1",
            model_version="cnn:9",
            image_uri=cells[0].image_uri,
            agree=True,
            corrected_class=None,
            reviewer="ann",
        )
    with pytest.raises(reviews.ReviewError, match="is an agreement"):
        verdict(factory, cells[0], False, "all")
    with pytest.raises(reviews.ReviewError, match="corrected class"):
        verdict(factory, cells[0], False, "blast")
    with pytest.raises(reviews.ReviewError, match="no scored result"), transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S9", model_version=MODEL, reviewer="ann", comment="")
    # The table's own checks hold against a writer that skips db.reviews.
    with pytest.raises(IntegrityError), transaction(factory) as s:
        s.execute(
            text(
                "INSERT INTO cell_verdicts (sample_id, model_version, image_uri, agree, corrected_class, reviewer, "
                "reviewed_at) VALUES ('S1', 'cnn:1', 'x', :agree, 'blast', 'eve', CURRENT_TIMESTAMP)"
            ),
            {"agree": False},
        )
    with pytest.raises(IntegrityError), transaction(factory) as s:
        s.execute(
            text(
                "INSERT INTO cell_verdicts (sample_id, model_version, image_uri, agree, corrected_class, reviewer, "
                "reviewed_at) VALUES ('S1', 'cnn:1', 'x', :agree, 'hem', 'eve', CURRENT_TIMESTAMP)"
            ),
            {"agree": True},
        )
    with transaction(factory) as s:
        assert reviews.verdicts(session=s, sample_id="S1", model_version=MODEL) == {}


def reviewer_accounts_are_added_once_and_replaced_on_request(factory: Factory) -> None:
    with transaction(factory) as s:
        reviews.add_user(session=s, name="ann", password_hash="h1", can_write=True)
    with pytest.raises(reviews.ReviewError, match="exists already"), transaction(factory) as s:
        reviews.add_user(session=s, name="ann", password_hash="h2", can_write=True)
    with transaction(factory) as s:
        reviews.add_user(session=s, name="ann", password_hash="h3", can_write=False, replace=True)
        found = reviews.get_user(session=s, name="ann")
        assert found == (reviews.Reviewer("ann", False), "h3")
        assert reviews.get_user(session=s, name="nobody") is None


# --- cancelling ---------------------------------------------------------------------------------------------

CANCEL_VERSION = "m:v1"


def queue(sessions: Factory, job: str, *samples: str) -> dict[str, repo.Delivery]:
    """Submit `samples` under `job` (model m:v1); returns the delivery (fencing token) each one's message carries."""
    with transaction(sessions) as s:
        register_model(s, name="m", version="v1")
    return {sample: repo.Delivery(job, n) for sample, n in submit(sessions, job, list(samples), CANCEL_VERSION).items()}


def status_of(sessions: Factory, sample: str) -> str:
    with sessions() as s:
        return str(repo.get_sample_status(session=s, sample_id=sample, model_version=CANCEL_VERSION))


def cancelled_samples_end_and_their_deliveries_write_nothing(sessions: Factory) -> None:
    """Shared with PostgreSQL: queued and running samples cancel, ended ones stay, deliveries then write nothing."""
    d = queue(sessions, "job-c", "queued", "running", "done")
    with transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="running", model_version=CANCEL_VERSION, delivery=d["running"])
        repo.mark_running(session=s, sample_id="done", model_version=CANCEL_VERSION, delivery=d["done"])
        cells = [CellResult("a.bmp", 0.9, True, None)]
        summary = SampleSummary(1, 1, 0, 1.0, 0.2, 1.0, None, 0.9, ())
        repo.record_sample_result(
            session=s, sample_id="done", model_version=CANCEL_VERSION, cells=cells, summary=summary, delivery=d["done"]
        )
    with sessions() as s:  # a running delivery is still the current one
        repo.check_current(session=s, sample_id="running", model_version=CANCEL_VERSION, delivery=d["running"])
    with transaction(sessions) as s:
        cancelled = repo.cancel_samples(session=s, job_id="job-c")
    assert [(c.sample_id, c.was) for c in cancelled] == [("queued", "queued"), ("running", "running")]
    assert [status_of(sessions, x) for x in ("queued", "running", "done")] == ["cancelled", "cancelled", "done"]
    # The queued sample's message arrives: it is not run.
    with pytest.raises(errors.SampleCancelled), transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="queued", model_version=CANCEL_VERSION, delivery=d["queued"])
    # The running one asks before its next batch, and could not write its result anyway.
    with pytest.raises(errors.SampleCancelled), sessions() as s:
        repo.check_current(session=s, sample_id="running", model_version=CANCEL_VERSION, delivery=d["running"])
    with pytest.raises(errors.SampleCancelled), transaction(sessions) as s:
        repo.record_sample_result(
            session=s,
            sample_id="running",
            model_version=CANCEL_VERSION,
            cells=[CellResult("b.bmp", 0.1, False, None)],
            summary=SampleSummary(1, 0, 0, 0.0, 0.0, 0.8, None, 0.1, ()),
            delivery=d["running"],
        )
    with transaction(sessions) as s:  # nothing left to cancel
        assert repo.cancel_samples(session=s, sample_ids=["queued", "done"]) == []
    rows = {r["sample_id"]: r for r in results(sessions, job_id="job-c")}
    assert rows["running"]["error"] == "cancelled" and rows["running"]["finished_at"] is not None
    assert rows["done"]["n_cells"] == 1
    # A resubmission takes the sample again; a delivery of the cancelled submission is now just stale.
    d2 = queue(sessions, "job-c2", "running")
    with pytest.raises(errors.StaleDelivery) as raised, transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="running", model_version=CANCEL_VERSION, delivery=d["running"])
    assert not isinstance(raised.value, errors.SampleCancelled)
    with transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="running", model_version=CANCEL_VERSION, delivery=d2["running"])


SAMPLE_SCENARIOS: list[Scenario] = [
    a_sample_goes_queued_running_done_or_failed_in_the_views,
    resubmitting_replaces_the_result_and_a_new_version_adds_one,
    repository_functions_leave_committing_to_the_caller,
    mistakes_get_typed_errors_and_the_transaction_stays_usable,
    cancelled_samples_end_and_their_deliveries_write_nothing,
]
REVIEW_SCENARIOS: list[Scenario] = [
    verdicts_correct_the_reviewed_fraction_and_a_sign_off_shows,
    verdicts_and_sign_offs_survive_a_rescore,
    verdicts_only_on_scored_cells_with_a_meaningful_class,
    reviewer_accounts_are_added_once_and_replaced_on_request,
]


def scenario_id(scenario: Scenario) -> str:
    """A scenario's test id: its name, which says what it checks."""
    return scenario.__name__

"""Typed errors of the database layer; each message names the input and says what to do."""

from __future__ import annotations

from core.errors import AllscoreError


class DatabaseError(AllscoreError):
    """Base of the errors raised by db/."""


class DatabaseUrlError(DatabaseError, ValueError):
    """The database URL cannot be used."""


class InvalidIdentifierError(DatabaseError, ValueError):
    """A sample or job id is empty, too long or holds control characters."""


class JobExistsError(DatabaseError):
    """A job with this id exists already."""


class JobNotFoundError(DatabaseError, LookupError):
    """No job with this id."""

    exit_code = 4


class SampleNotFoundError(DatabaseError, LookupError):
    """No sample row for this (sample_id, model_version)."""

    exit_code = 4


class StaleDelivery(DatabaseError):
    """A delivery whose submission is no longer the sample's current one, or whose sample has already ended."""


class SampleCancelled(StaleDelivery):
    """The sample was cancelled (allscore cancel): a delivery stops and writes nothing."""


class ModelConflictError(DatabaseError):
    """A model version is registered already with a different artifact."""


class ResultMismatchError(DatabaseError, ValueError):
    """A sample summary disagrees with its cell results."""


class MigrationError(DatabaseError):
    """The schema cannot be brought to the requested revision."""

"""The storage errors, and the tables that map foreign failures (OSError, botocore, s3transfer) onto them.

Every store raises only these: a caller tells a missing object from a refused one, a transient failure (retry) from
a permanent one, without knowing which store or library answered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterator
from typing import Any

from core.errors import AllscoreError


class StorageError(AllscoreError):
    """An object store operation failed; the message names the URI and what to do."""

    def __init__(self, uri: str, message: str) -> None:
        self.uri = uri
        super().__init__(message)


class ObjectNotFound(StorageError):
    """The object (file or S3 key) does not exist."""


class AlreadyExists(StorageError):
    """A write with overwrite=False found the object already there."""


class StoreDenied(StorageError):
    """The store refuses every read of this kind: no such bucket, access denied, bad or missing credentials.

    Unlike a missing or unreadable object, this will not pass and is not about one image: the worker fails the
    whole sample with the reason instead of marking every cell.
    """


class BucketNotFound(StoreDenied):
    """The S3 bucket does not exist (or is not visible with these credentials)."""


class StorageUnavailable(StorageError):
    """The store could not be reached or answered with a transient failure; retrying may succeed."""

    exit_code = 5


class InvalidURI(StorageError, ValueError):
    """The URI is malformed or uses a scheme no store handles."""


class ObjectRefused(StorageError):
    """The object is not read: outside the allowed roots, not a regular file, or over the byte limit."""


def too_large_message(uri: str, size: int, limit: int) -> str:
    """What ObjectRefused says of an object over the byte limit."""
    return (
        f"{uri} is {size} bytes or more; the limit is {limit} (ALLSCORE_MAX_IMAGE_BYTES): "
        "give a smaller image or raise the limit"
    )


def already_exists(uri: str) -> AlreadyExists:
    """The error of a write with overwrite=False that found the object there."""
    return AlreadyExists(uri, f"{uri} already exists; choose a new name or pass overwrite=True")


# --- local files: OSError -> StorageError --------------------------------------------------------------------

# First match wins (FileNotFoundError is an OSError too). Fields: {uri}, {filename}, {reason}.
OS_ERRORS: tuple[tuple[type[OSError], type[StorageError], str], ...] = (
    (FileNotFoundError, ObjectNotFound, "{uri}: no such file ({filename}); check the path"),
    (IsADirectoryError, StorageError, "{uri} is a folder, not a file; name a file inside it"),
    (PermissionError, StorageError, "{uri}: permission denied; check the file's owner and mode"),
    (OSError, StorageError, "{uri}: {reason}; check the disk and the path"),
)


def from_os_error(exc: OSError, uri: str) -> StorageError:
    """The StorageError that OS_ERRORS maps `exc` to."""
    for kind, error, message in OS_ERRORS:
        if isinstance(exc, kind):
            return error(uri, message.format(uri=uri, filename=exc.filename, reason=exc.strerror or exc))
    raise AssertionError("OS_ERRORS ends with OSError")  # pragma: no cover


@contextlib.contextmanager
def os_errors(uri: str) -> Iterator[None]:
    """Raise an OSError of the block as the StorageError OS_ERRORS gives, naming uri."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise from_os_error(exc, uri) from exc


# --- S3: botocore's ClientError codes and HTTP statuses -> StorageError --------------------------------------

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_NO_BUCKET_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})

# First match wins: (error codes, HTTP statuses, error, message). Fields: {uri}, {code} (the code, else the status),
# {exc}. NoSuchBucket is not here: its message names the bucket and the endpoint (no_bucket_message).
S3_CLIENT_ERRORS: tuple[tuple[frozenset[str], Container[int], type[StorageError], str], ...] = (
    (_NOT_FOUND_CODES, (404,), ObjectNotFound,
     "{uri}: no such object; check the key (list the prefix to see what exists)"),
    (frozenset({"PreconditionFailed"}), (412,), AlreadyExists,
     "{uri} already exists; choose a new name or pass overwrite=True"),
    (frozenset({"ConditionalRequestConflict"}), (), StorageUnavailable,
     "{uri}: another writer is creating this object right now; retry"),
    (frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}), (403,), StoreDenied,
     "{uri}: access denied ({code}); check the AWS credentials and the bucket's policy"),
    (frozenset({"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"}), range(500, 1000),
     StorageUnavailable, "{uri}: the S3 server failed ({code}) after retries; retry later"),
)  # fmt: skip


def client_error_code(exc: Any) -> tuple[str, int]:
    """The error code and HTTP status of a botocore ClientError ("" and 0 where absent)."""
    response = getattr(exc, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_not_found(exc: Any, *, bucket: bool = False) -> bool:
    """Whether a ClientError says 404: no such key (or, with bucket=True, no such bucket)."""
    code, status = client_error_code(exc)
    return status == 404 or code in (_NO_BUCKET_CODES if bucket else _NOT_FOUND_CODES)


def no_bucket_message(uri: str, bucket: str, endpoint: str | None) -> str:
    """What BucketNotFound says."""
    return (
        f"{uri}: bucket {bucket!r} does not exist at {endpoint or 'AWS'}; create it, or check the bucket name "
        "and ALLSCORE_S3_ENDPOINT_URL"
    )


def from_client_error(exc: Any, uri: str, bucket: str, endpoint: str | None) -> StorageError:
    """The StorageError for a botocore ClientError: NoSuchBucket, then S3_CLIENT_ERRORS, else a plain refusal."""
    code, status = client_error_code(exc)
    if code == "NoSuchBucket":
        return BucketNotFound(uri, no_bucket_message(uri, bucket, endpoint))
    for codes, statuses, error, message in S3_CLIENT_ERRORS:
        if code in codes or status in statuses:
            return error(uri, message.format(uri=uri, code=code or status, exc=exc))
    return StorageError(uri, f"{uri}: S3 refused the request ({code or status}: {exc}); check the URI")


# --- S3: botocore's and s3transfer's other exceptions -> StorageError ----------------------------------------


def _s3_exceptions() -> tuple[tuple[tuple[type[BaseException], ...], type[StorageError], str], ...]:
    """First match wins (botocore's SSLError is a ConnectionError). Fields: {uri}, {where}, {exc}. Built on use:
    botocore is imported only by what talks to S3."""
    from botocore import exceptions as bx
    from s3transfer.exceptions import RetriesExceededError

    return (
        ((bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError), StoreDenied,
         "{uri}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ((bx.SSLError,), StorageError,
         "{uri}: TLS failure talking to {where} ({exc}); check the endpoint's certificate or AWS_CA_BUNDLE"),
        ((bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, RetriesExceededError), StorageUnavailable,
         "{uri}: cannot reach {where} ({exc}); check that the S3 server is up and ALLSCORE_S3_ENDPOINT_URL is right, "
         "then retry"),
        ((bx.ParamValidationError,), InvalidURI, "{uri}: invalid S3 request ({exc}); check the bucket and key"),
    )  # fmt: skip


@contextlib.contextmanager
def s3_errors(uri: str, bucket: str, endpoint: str | None) -> Iterator[None]:
    """Raise a botocore or s3transfer failure of the block as the StorageError the tables above give, naming uri;
    anything else passes unchanged."""
    from botocore.exceptions import ClientError

    try:
        yield
    except StorageError:
        raise
    except ClientError as exc:
        raise from_client_error(exc, uri, bucket, endpoint) from exc
    except Exception as exc:
        for kinds, error, message in _s3_exceptions():
            if isinstance(exc, kinds):
                raise error(uri, message.format(uri=uri, where=endpoint or "AWS S3", exc=exc)) from exc
        raise

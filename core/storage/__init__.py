"""One object-store interface over local folders (plain paths, file:// URIs) and s3://bucket/key.

Where things live: `errors` (the StorageError family and the tables that map OSError and botocore failures onto
it), `uris` (parsing, joining, allowed roots), `local` (LocalStore, atomic writes), `s3` (S3Store), `store` (the
ObjectStore interface, store_for), `fetch` (Fetcher). The names below are the package's public interface:
`from core.storage import X` is how the rest of allscore imports them.
"""

from __future__ import annotations

from core.storage.errors import (
    AlreadyExists,
    BucketNotFound,
    InvalidURI,
    ObjectNotFound,
    ObjectRefused,
    StorageError,
    StorageUnavailable,
    StoreDenied,
)
from core.storage.fetch import Fetcher
from core.storage.local import TMP_PREFIX, LocalStore
from core.storage.s3 import S3Store
from core.storage.store import ObjectStore, store_for
from core.storage.uris import is_s3, join_uri, parse_s3, within_roots

__all__ = [
    "TMP_PREFIX",
    "AlreadyExists",
    "BucketNotFound",
    "Fetcher",
    "InvalidURI",
    "LocalStore",
    "ObjectNotFound",
    "ObjectRefused",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "StorageUnavailable",
    "StoreDenied",
    "is_s3",
    "join_uri",
    "parse_s3",
    "store_for",
    "within_roots",
]

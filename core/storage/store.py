"""The one interface every store has (ObjectStore), and store_for: which store handles a URI."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from core.settings import Settings
from core.storage.local import LocalStore
from core.storage.s3 import S3Store
from core.storage.uris import check_scheme, is_s3


@runtime_checkable
class ObjectStore(Protocol):
    """Read and write whole objects by URI; every method raises StorageError subclasses."""

    def read_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The object's content."""
        ...

    def write_bytes(self, uri: str, data: bytes, *, overwrite: bool = True) -> None:
        """Store data at uri; with overwrite=False raise AlreadyExists rather than replace."""
        ...

    def exists(self, uri: str) -> bool:
        """Whether an object (not a folder) exists at uri."""
        ...

    def list(self, prefix_uri: str, *, suffixes: tuple[str, ...] | None = None) -> list[str]:
        """Full URIs of all objects under the folder prefix_uri, recursively, sorted."""
        ...

    def download(self, uri: str, dest: Path) -> Path:
        """Stream the object into the file dest (replaced atomically) and return dest."""
        ...

    def upload(self, src: Path, uri: str, *, overwrite: bool = True) -> None:
        """Store the file src at uri; with overwrite=False raise AlreadyExists rather than replace."""
        ...


def store_for(uri: str, settings: Settings | None = None) -> ObjectStore:
    """The store that handles uri: S3Store for s3://, LocalStore for paths and file:// URIs.

    Building a store is cheap (the S3 client is made on first use); keep the store to reuse its client.
    """
    if is_s3(uri):
        return S3Store(settings)
    check_scheme(uri)
    return LocalStore()

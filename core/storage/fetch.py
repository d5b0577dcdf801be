"""Fetcher: what the worker's I/O threads, the review app and the montage read images with."""

from __future__ import annotations

from core.settings import Settings, get_settings
from core.storage.errors import ObjectRefused
from core.storage.store import ObjectStore, store_for
from core.storage.uris import is_s3, parse_s3, within_roots


class Fetcher:
    """Reads whole objects by URI from any store: one S3 store (and client) per bucket, safe across threads.

    It trusts no URI it is given: each must lie under the settings' allowed roots (when set), be a regular file
    or object, and be at most max_image_bytes long, checked before anything is read. Local paths need no state;
    store_for refuses, on every call, a scheme no store handles.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings
        current = settings or get_settings()
        self.roots = list(current.allowed_roots)
        self.max_bytes = current.max_image_bytes
        self._buckets: dict[str, ObjectStore] = {}

    def __call__(self, uri: str) -> bytes:
        if not within_roots(uri, self.roots):
            raise ObjectRefused(
                uri, f"{uri} is outside the allowed roots ({', '.join(self.roots)}); the worker does not read it"
            )
        if not is_s3(uri):
            return store_for(uri, self.settings).read_bytes(uri, max_bytes=self.max_bytes)
        bucket = parse_s3(uri)[0]
        store = self._buckets.get(bucket)
        if store is None:
            store = self._buckets.setdefault(bucket, store_for(uri, self.settings))
        return store.read_bytes(uri, max_bytes=self.max_bytes)

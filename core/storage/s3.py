"""S3Store: objects in S3 or any S3-compatible endpoint (boto3, path-style, retries, streaming, conditional puts)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

from core.settings import Settings, get_settings
from core.storage.errors import (
    BucketNotFound,
    InvalidURI,
    ObjectRefused,
    StorageError,
    already_exists,
    client_error_code,
    is_not_found,
    no_bucket_message,
    os_errors,
    s3_errors,
    too_large_message,
)
from core.storage.local import atomic_replace
from core.storage.uris import matches_suffixes, parse_s3

log = logging.getLogger(__name__)

_MIB = 1024 * 1024

# A single PUT (the only conditional write that needs no multipart bookkeeping) is capped at 5 GiB.
MAX_SINGLE_PUT = 5 * 1024**3


class S3Store:
    """Objects in S3 or any S3-compatible endpoint, configured from Settings; the client is built lazily."""

    # Objects above the threshold move in parallel parts of chunksize (multipart upload, ranged GETs).
    multipart_threshold = 64 * _MIB
    multipart_chunksize = 16 * _MIB

    def __init__(self, settings: Settings | None = None, *, client: Any = None) -> None:
        self._settings = settings
        self._client_obj = client
        self._client_pid = os.getpid() if client is not None else None
        self._lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        """The settings this store was built with (the process's settings when none were given)."""
        return self._settings if self._settings is not None else get_settings()

    @property
    def client(self) -> Any:
        """The boto3 S3 client, built on first use and again after a fork (sockets do not survive it)."""
        with self._lock:
            if self._client_obj is None or self._client_pid != os.getpid():
                self._client_obj = self._build_client()
                self._client_pid = os.getpid()
            return self._client_obj

    def _build_client(self) -> Any:
        import boto3
        from botocore.config import Config

        s = self.settings
        config = Config(
            region_name=s.s3_region,
            s3={"addressing_style": "path"},
            # total_max_attempts counts the first try; botocore's "max_attempts" key counts only retries.
            retries={"total_max_attempts": s.s3_max_attempts, "mode": "standard"},
            connect_timeout=s.s3_connect_timeout,
            read_timeout=s.s3_read_timeout,
        )
        # A session per store: boto3's default session is shared module state and not thread-safe.
        return boto3.session.Session().client("s3", endpoint_url=s.s3_endpoint_url, config=config)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=4,
            preferred_transfer_client="classic",
        )

    def _errors(self, uri: str) -> contextlib.AbstractContextManager[None]:
        """botocore's and s3transfer's failures as StorageErrors that name uri (core.storage.errors' tables)."""
        return s3_errors(uri, parse_s3(uri)[0], self.settings.s3_endpoint_url)

    def read_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The object's content; at most `max_bytes` of it (else ObjectRefused, the rest never downloaded)."""
        bucket, key = self._object(uri)
        with self._errors(uri):
            answer = self.client.get_object(Bucket=bucket, Key=key)
            body = answer["Body"]
            with contextlib.closing(body):
                size = int(answer.get("ContentLength") or 0)
                if max_bytes is not None and size > max_bytes:
                    raise ObjectRefused(uri, too_large_message(uri, size, max_bytes))
                if max_bytes is None:
                    return bytes(body.read())
                # As for files: ask for what the object says it holds (plus one byte), never the cap itself.
                data = bytes(body.read(min(max_bytes, size) + 1 if size else max_bytes + 1))
                if len(data) > max_bytes:
                    raise ObjectRefused(uri, too_large_message(uri, len(data), max_bytes))
                return data

    def write_bytes(self, uri: str, data: bytes, *, overwrite: bool = True) -> None:
        """Put the object; overwrite=False is a conditional put (If-None-Match: *) that S3 decides."""
        self._put(uri, data, overwrite=overwrite)

    def exists(self, uri: str) -> bool:
        """Whether the key exists; BucketNotFound if the bucket itself is missing."""
        from botocore.exceptions import ClientError

        bucket, key = self._object(uri)
        with self._errors(uri):
            try:
                self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if is_not_found(exc):
                    self._check_bucket(bucket, uri)
                    return False
                raise
        return True

    def list(self, prefix_uri: str, *, suffixes: tuple[str, ...] | None = None) -> list[str]:
        """All objects under the folder prefix_uri (recursive, sorted) as s3:// URIs."""
        bucket, prefix = parse_s3(prefix_uri)
        if prefix and not prefix.endswith("/"):
            # Folder semantics, as for local paths: s3://b/data must not match s3://b/data2/x.
            prefix += "/"
        found = []
        with self._errors(prefix_uri):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    # Zero-byte "folder" markers made by consoles are not objects.
                    if key.endswith("/") or not matches_suffixes(key, suffixes):
                        continue
                    found.append(f"s3://{bucket}/{key}")
        return sorted(found)

    def download(self, uri: str, dest: Path) -> Path:
        """Stream the object (in parallel ranged parts when large) to a temp file, then rename it to dest."""
        bucket, key = self._object(uri)
        dest = Path(dest)
        # S3 errors are translated innermost: botocore's timeout errors are also OSErrors.
        with os_errors(str(dest)), self._errors(uri):
            atomic_replace(
                dest,
                lambda f: self.client.download_fileobj(bucket, key, f, Config=self._transfer_config()),
            )
        return dest

    def upload(self, src: Path, uri: str, *, overwrite: bool = True) -> None:
        """Upload a file (multipart when large); overwrite=False uses one conditional PUT (up to 5 GiB)."""
        bucket, key = self._object(uri)
        src = Path(src)
        with os_errors(str(src)), src.open("rb") as fin:
            if not overwrite:
                size = os.fstat(fin.fileno()).st_size
                if size > MAX_SINGLE_PUT:
                    raise StorageError(
                        uri,
                        f"{src} is {size} bytes, over the 5 GiB a conditional upload to {uri} allows; "
                        "upload with overwrite=True after checking that the key is free",
                    )
                self._put(uri, fin, overwrite=False)
                return
            with self._errors(uri):
                self.client.upload_fileobj(fin, bucket, key, Config=self._transfer_config())

    def _put(self, uri: str, body: bytes | IO[bytes], *, overwrite: bool) -> None:
        from botocore.exceptions import ClientError

        bucket, key = self._object(uri)
        extra = {} if overwrite else {"IfNoneMatch": "*"}
        with self._errors(uri):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=body, **extra)
            except ClientError as exc:
                code, status = client_error_code(exc)
                if overwrite or not (status == 501 or code == "NotImplemented"):
                    raise
                # Older S3-compatible servers lack conditional writes: check, then put (not atomic).
                log.warning(
                    "%s does not support If-None-Match; falling back to check-then-put for %s",
                    self.settings.s3_endpoint_url or "the S3 endpoint",
                    uri,
                )
                if self.exists(uri):
                    raise already_exists(uri) from exc
                if not isinstance(body, bytes):
                    body.seek(0)
                self.client.put_object(Bucket=bucket, Key=key, Body=body)

    @staticmethod
    def _object(uri: str) -> tuple[str, str]:
        bucket, key = parse_s3(uri)
        if not key or key.endswith("/"):
            raise InvalidURI(uri, f"{uri!r} names a bucket or folder, not an object; add the key")
        return bucket, key

    def ensure_bucket(self, uri: str) -> bool:
        """Create the bucket of `uri` unless it exists; return True when it was created."""
        from botocore.exceptions import ClientError

        bucket = parse_s3(uri)[0]
        with self._errors(uri):
            try:
                self.client.head_bucket(Bucket=bucket)
                return False
            except ClientError as exc:
                if not is_not_found(exc, bucket=True):
                    raise
            try:
                self.client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                # Two one-shot containers may race; the bucket existing is the outcome both wanted.
                if client_error_code(exc)[0] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return False
                raise
        return True

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """Tell a missing bucket from a missing key after a HEAD 404 (HEAD responses carry no error code)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if is_not_found(exc, bucket=True):
                raise BucketNotFound(uri, no_bucket_message(uri, bucket, self.settings.s3_endpoint_url)) from exc
            # 403 and the like: the bucket exists (or we may not ask); the key is what is missing.

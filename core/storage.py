"""One object-store interface over local folders (plain paths, file:// URIs) and s3://bucket/key."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from core.errors import AllscoreError
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Files a writer is still filling carry this prefix; list() hides them.
TMP_PREFIX = ".allscore-tmp-"

# A single PUT (the only conditional write that needs no multipart bookkeeping) is capped at 5 GiB.
_MAX_SINGLE_PUT = 5 * 1024**3

_MIB = 1024 * 1024


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


def _too_large(uri: str, size: int, limit: int) -> str:
    return (
        f"{uri} is {size} bytes or more; the limit is {limit} (ALLSCORE_MAX_IMAGE_BYTES): "
        "give a smaller image or raise the limit"
    )


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


# --- URIs -------------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    """Whether uri is an s3:// URI."""
    return uri[:5].lower() == "s3://"


def parse_s3(uri: str) -> tuple[str, str]:
    """Split s3://bucket/key into (bucket, key); the key may be empty (the bucket's root)."""
    if not is_s3(uri):
        raise InvalidURI(uri, f"{uri!r} is not an s3:// URI; write it as s3://bucket/key")
    # Not urlsplit: keys may legally contain '?' and '#'.
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidURI(uri, f"{uri!r} names no bucket; write it as s3://bucket/key")
    return bucket, key


def join_uri(base: str, *parts: str) -> str:
    """Join a path or URI with relative parts using '/' (s3://b + 'x/y' -> s3://b/x/y)."""
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if not pieces:
        return base
    if not base:
        return "/".join(pieces)
    return (base if base.endswith("/") else base + "/") + "/".join(pieces)


def _is_file_uri(uri: str) -> bool:
    return uri[:7].lower() == "file://"


def _local_path(uri: str) -> Path:
    """The filesystem path for a plain path or a file:// URI."""
    if _is_file_uri(uri):
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidURI(uri, f"{uri!r} names a remote host; use file:///absolute/path")
        return Path(urllib.parse.unquote(parts.path))
    return Path(uri).expanduser()


def store_for(uri: str, settings: Settings | None = None) -> ObjectStore:
    """The store that handles uri: S3Store for s3://, LocalStore for paths and file:// URIs.

    Building a store is cheap (the S3 client is made on first use); keep the store to reuse its client.
    """
    if is_s3(uri):
        return S3Store(settings)
    scheme = urllib.parse.urlsplit(uri).scheme
    # A one-letter scheme is a Windows drive ("C:\\data"), not a URL.
    if scheme and scheme.lower() != "file" and len(scheme) > 1:
        raise InvalidURI(uri, f"{uri!r}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")
    return LocalStore()


def within_roots(uri: str, roots: list[str]) -> bool:
    """Whether uri lies under one of `roots` (local folders or s3:// prefixes); True when there are none.

    Local paths are resolved first (`..` removed, links followed), so a path cannot climb out of its root.
    """
    if not roots:
        return True
    for root in roots:
        if is_s3(root) or is_s3(uri):
            prefix = root.rstrip("/")
            if is_s3(root) and is_s3(uri) and (uri == prefix or uri.startswith(prefix + "/")):
                return True
            continue
        try:
            if _local_path(uri).resolve().is_relative_to(Path(root).expanduser().resolve()):
                return True
        except (OSError, ValueError):
            return False
    return False


class Fetcher:
    """Reads whole objects by URI from any store: one S3 store (and client) per bucket, safe across threads.

    What the worker's I/O threads and the montage read cells with. It trusts no URI it is given: each must lie
    under the settings' allowed roots (when set), be a regular file or object, and be at most max_image_bytes
    long, checked before anything is read. Local paths need no state; store_for refuses, on every call, a
    scheme no store handles.
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


def _matches(name: str, suffixes: tuple[str, ...] | None) -> bool:
    if suffixes is None:
        return True
    lower = name.lower()
    return any(lower.endswith(s.lower()) for s in suffixes)


# --- local folders ----------------------------------------------------------------------------------------


class LocalStore:
    """Objects as files under local folders; writes are atomic (temp file, then rename or link)."""

    def read_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The file's content; only a regular file, and at most `max_bytes` of it (else ObjectRefused)."""
        path = _local_path(uri)
        with self._errors(uri):
            try:
                # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            except (ValueError, UnicodeError) as exc:
                raise InvalidURI(
                    uri, f"{uri!r} is not a usable path ({exc}); remove NUL bytes and odd characters"
                ) from exc
            with os.fdopen(fd, "rb") as fh:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise ObjectRefused(
                        uri, f"{uri} is not a regular file (a device, FIFO or socket); give an image file"
                    )
                if max_bytes is not None and info.st_size > max_bytes:
                    raise ObjectRefused(uri, _too_large(uri, info.st_size, max_bytes))
                if max_bytes is None:
                    return fh.read()
                # read(n) allocates n bytes up front: ask for what the file holds (one more byte shows growth),
                # never the cap itself (a 256 MiB buffer per cell cost 0.3 ms a read).
                data = fh.read(min(max_bytes, info.st_size) + 1)
                if len(data) > info.st_size:  # it grew while being read: read on, still capped (rare)
                    data += fh.read(max_bytes + 1 - len(data))
                if len(data) > max_bytes:
                    raise ObjectRefused(uri, _too_large(uri, len(data), max_bytes))
                return data

    def write_bytes(self, uri: str, data: bytes, *, overwrite: bool = True) -> None:
        """Write data atomically; overwrite=False refuses (AlreadyExists) if the file exists."""
        self._write(uri, lambda f: f.write(data), overwrite=overwrite)

    def exists(self, uri: str) -> bool:
        """Whether a file (not a folder) exists at uri."""
        return _local_path(uri).is_file()

    def ensure_folder(self, uri: str) -> bool:
        """Create the folder at uri (a path or file:// URI) unless it exists; return True when it was created."""
        path = _local_path(uri)
        with self._errors(uri):
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
        return created

    def list(self, prefix_uri: str, *, suffixes: tuple[str, ...] | None = None) -> list[str]:
        """All files under the folder prefix_uri (recursive, sorted), in the same form as prefix_uri."""
        root = _local_path(prefix_uri)
        if not root.is_dir():
            return []
        quote = _is_file_uri(prefix_uri)
        found = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith(TMP_PREFIX) or not _matches(name, suffixes):
                    continue
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                found.append(join_uri(prefix_uri, urllib.parse.quote(rel) if quote else rel))
        return sorted(found)

    def download(self, uri: str, dest: Path) -> Path:
        """Copy the file to dest through a temp file and an atomic rename."""
        src = _local_path(uri)
        dest = Path(dest)
        with self._errors(uri), src.open("rb") as fin:
            _atomic_replace(dest, lambda f: shutil.copyfileobj(fin, f, 4 * _MIB))
        return dest

    def upload(self, src: Path, uri: str, *, overwrite: bool = True) -> None:
        """Copy the file src to uri atomically; overwrite=False refuses if the target exists."""
        with self._errors(str(src)), Path(src).open("rb") as fin:
            self._write(uri, lambda f: shutil.copyfileobj(fin, f, 4 * _MIB), overwrite=overwrite)

    def _write(self, uri: str, fill: Callable[[IO[bytes]], object], *, overwrite: bool) -> None:
        path = _local_path(uri)
        with self._errors(uri):
            if overwrite:
                _atomic_replace(path, fill)
            else:
                _atomic_create(path, fill, uri)

    @staticmethod
    @contextlib.contextmanager
    def _errors(uri: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as exc:
            raise ObjectNotFound(uri, f"{uri}: no such file ({exc.filename}); check the path") from exc
        except IsADirectoryError as exc:
            raise StorageError(uri, f"{uri} is a folder, not a file; name a file inside it") from exc
        except PermissionError as exc:
            raise StorageError(uri, f"{uri}: permission denied; check the file's owner and mode") from exc
        except OSError as exc:
            raise StorageError(uri, f"{uri}: {exc.strerror or exc}; check the disk and the path") from exc


def _fill_temp(path: Path, fill: Callable[[IO[bytes]], object]) -> Path:
    """Write a complete, synced temp file beside path (same filesystem, so renames are atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=TMP_PREFIX + path.name + ".", delete=False) as f:
        tmp = Path(f.name)
        try:
            fill(f)
            f.flush()
            # Synced before the rename: a crash leaves the old object or the new one, never half of one.
            os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tmp


def _atomic_replace(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    tmp = _fill_temp(path, fill)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_create(path: Path, fill: Callable[[IO[bytes]], object], uri: str) -> None:
    """Publish a complete file only if none exists: link(2) fails if the name is taken, so one writer wins."""
    if path.exists():
        raise AlreadyExists(uri, f"{uri} already exists; choose a new name or pass overwrite=True")
    tmp = _fill_temp(path, fill)
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise AlreadyExists(uri, f"{uri} already exists; choose a new name or pass overwrite=True") from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # Filesystems without hard links: O_EXCL still lets only one writer create the name.
        _create_exclusive(path, tmp, uri)
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, tmp: Path, uri: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as exc:
        raise AlreadyExists(uri, f"{uri} already exists; choose a new name or pass overwrite=True") from exc
    with os.fdopen(fd, "wb") as out, tmp.open("rb") as fin:
        shutil.copyfileobj(fin, out, 4 * _MIB)


# --- S3 ---------------------------------------------------------------------------------------------------


def _client_error_code(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


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

    def read_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The object's content; at most `max_bytes` of it (else ObjectRefused, the rest never downloaded)."""
        bucket, key = self._object(uri)
        with self._errors(uri):
            answer = self.client.get_object(Bucket=bucket, Key=key)
            body = answer["Body"]
            with contextlib.closing(body):
                size = int(answer.get("ContentLength") or 0)
                if max_bytes is not None and size > max_bytes:
                    raise ObjectRefused(uri, _too_large(uri, size, max_bytes))
                if max_bytes is None:
                    return bytes(body.read())
                # As for files: ask for what the object says it holds (plus one byte), never the cap itself.
                data = bytes(body.read(min(max_bytes, size) + 1 if size else max_bytes + 1))
                if len(data) > max_bytes:
                    raise ObjectRefused(uri, _too_large(uri, len(data), max_bytes))
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
                code, status = _client_error_code(exc)
                if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
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
                    if key.endswith("/") or not _matches(key, suffixes):
                        continue
                    found.append(f"s3://{bucket}/{key}")
        return sorted(found)

    def download(self, uri: str, dest: Path) -> Path:
        """Stream the object (in parallel ranged parts when large) to a temp file, then rename it to dest."""
        bucket, key = self._object(uri)
        dest = Path(dest)
        # S3 errors are translated innermost: botocore's timeout errors are also OSErrors.
        with LocalStore._errors(str(dest)), self._errors(uri):
            _atomic_replace(
                dest,
                lambda f: self.client.download_fileobj(bucket, key, f, Config=self._transfer_config()),
            )
        return dest

    def upload(self, src: Path, uri: str, *, overwrite: bool = True) -> None:
        """Upload a file (multipart when large); overwrite=False uses one conditional PUT (up to 5 GiB)."""
        bucket, key = self._object(uri)
        src = Path(src)
        with LocalStore._errors(str(src)), src.open("rb") as fin:
            if not overwrite:
                size = os.fstat(fin.fileno()).st_size
                if size > _MAX_SINGLE_PUT:
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
                code, status = _client_error_code(exc)
                if overwrite or not (status == 501 or code == "NotImplemented"):
                    raise
                # Older S3-compatible servers lack conditional writes: check, then put (not atomic).
                log.warning(
                    "%s does not support If-None-Match; falling back to check-then-put for %s",
                    self.settings.s3_endpoint_url or "the S3 endpoint",
                    uri,
                )
                if self.exists(uri):
                    raise AlreadyExists(uri, f"{uri} already exists; choose a new name or pass overwrite=True") from exc
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
                code, status = _client_error_code(exc)
                if not (status == 404 or code in ("404", "NoSuchBucket", "NotFound")):
                    raise
            try:
                self.client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                # Two one-shot containers may race; the bucket existing is the outcome both wanted.
                if _client_error_code(exc)[0] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return False
                raise
        return True

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """Tell a missing bucket from a missing key after a HEAD 404 (HEAD responses carry no error code)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code, status = _client_error_code(exc)
            if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
                raise BucketNotFound(uri, self._no_bucket(bucket, uri)) from exc
            # 403 and the like: the bucket exists (or we may not ask); the key is what is missing.

    def _no_bucket(self, bucket: str, uri: str) -> str:
        where = self.settings.s3_endpoint_url or "AWS"
        return (
            f"{uri}: bucket {bucket!r} does not exist at {where}; create it, or check the bucket name "
            "and ALLSCORE_S3_ENDPOINT_URL"
        )

    @contextlib.contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Translate botocore and s3transfer failures into StorageError subclasses that name uri."""
        from botocore import exceptions as bx
        from s3transfer.exceptions import RetriesExceededError

        where = self.settings.s3_endpoint_url or "AWS S3"
        try:
            yield
        except StorageError:
            raise
        except bx.ClientError as exc:
            raise self._from_client_error(exc, uri) from exc
        except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError) as exc:
            raise StoreDenied(
                uri,
                f"{uri}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            ) from exc
        except bx.SSLError as exc:
            raise StorageError(
                uri,
                f"{uri}: TLS failure talking to {where} ({exc}); check the endpoint's certificate or AWS_CA_BUNDLE",
            ) from exc
        except (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, RetriesExceededError) as exc:
            raise StorageUnavailable(
                uri,
                f"{uri}: cannot reach {where} ({exc}); check that the S3 server is up and "
                "ALLSCORE_S3_ENDPOINT_URL is right, then retry",
            ) from exc
        except bx.ParamValidationError as exc:
            raise InvalidURI(uri, f"{uri}: invalid S3 request ({exc}); check the bucket and key") from exc

    def _from_client_error(self, exc: Any, uri: str) -> StorageError:
        code, status = _client_error_code(exc)
        bucket = parse_s3(uri)[0]
        if code == "NoSuchBucket":
            return BucketNotFound(uri, self._no_bucket(bucket, uri))
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return ObjectNotFound(uri, f"{uri}: no such object; check the key (list the prefix to see what exists)")
        if code == "PreconditionFailed" or status == 412:
            return AlreadyExists(uri, f"{uri} already exists; choose a new name or pass overwrite=True")
        if code == "ConditionalRequestConflict":
            return StorageUnavailable(uri, f"{uri}: another writer is creating this object right now; retry")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") or status == 403:
            return StoreDenied(uri, f"{uri}: access denied ({code}); check the AWS credentials and the bucket's policy")
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"):
            return StorageUnavailable(uri, f"{uri}: the S3 server failed ({code or status}) after retries; retry later")
        return StorageError(uri, f"{uri}: S3 refused the request ({code or status}: {exc}); check the URI")

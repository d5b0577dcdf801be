"""LocalStore: objects as files under local folders (plain paths and file:// URIs), written atomically."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO

from core.storage.errors import InvalidURI, ObjectRefused, already_exists, os_errors, too_large_message
from core.storage.uris import is_file_uri, join_uri, local_path, matches_suffixes

# Files a writer is still filling carry this prefix; list() hides them.
TMP_PREFIX = ".allscore-tmp-"

COPY_CHUNK = 4 * 1024 * 1024


class LocalStore:
    """Objects as files under local folders; writes are atomic (temp file, then rename or link)."""

    def read_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """The file's content; only a regular file, and at most `max_bytes` of it (else ObjectRefused)."""
        path = local_path(uri)
        with os_errors(uri):
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
                    raise ObjectRefused(uri, too_large_message(uri, info.st_size, max_bytes))
                if max_bytes is None:
                    return fh.read()
                # read(n) allocates n bytes up front: ask for what the file holds (one more byte shows growth),
                # never the cap itself (allocating a 256 MiB buffer for every cell showed in the bench's reads).
                data = fh.read(min(max_bytes, info.st_size) + 1)
                if len(data) > info.st_size:  # it grew while being read: read on, still capped (rare)
                    data += fh.read(max_bytes + 1 - len(data))
                if len(data) > max_bytes:
                    raise ObjectRefused(uri, too_large_message(uri, len(data), max_bytes))
                return data

    def write_bytes(self, uri: str, data: bytes, *, overwrite: bool = True) -> None:
        """Write data atomically; overwrite=False refuses (AlreadyExists) if the file exists."""
        self._write(uri, lambda f: f.write(data), overwrite=overwrite)

    def exists(self, uri: str) -> bool:
        """Whether a file (not a folder) exists at uri."""
        return local_path(uri).is_file()

    def ensure_folder(self, uri: str) -> bool:
        """Create the folder at uri (a path or file:// URI) unless it exists; return True when it was created."""
        path = local_path(uri)
        with os_errors(uri):
            created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
        return created

    def list(self, prefix_uri: str, *, suffixes: tuple[str, ...] | None = None) -> list[str]:
        """All files under the folder prefix_uri (recursive, sorted), in the same form as prefix_uri."""
        root = local_path(prefix_uri)
        if not root.is_dir():
            return []
        quote = is_file_uri(prefix_uri)
        found = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith(TMP_PREFIX) or not matches_suffixes(name, suffixes):
                    continue
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                found.append(join_uri(prefix_uri, urllib.parse.quote(rel) if quote else rel))
        return sorted(found)

    def download(self, uri: str, dest: Path) -> Path:
        """Copy the file to dest through a temp file and an atomic rename."""
        src = local_path(uri)
        dest = Path(dest)
        with os_errors(uri), src.open("rb") as fin:
            atomic_replace(dest, lambda f: shutil.copyfileobj(fin, f, COPY_CHUNK))
        return dest

    def upload(self, src: Path, uri: str, *, overwrite: bool = True) -> None:
        """Copy the file src to uri atomically; overwrite=False refuses if the target exists."""
        with os_errors(str(src)), Path(src).open("rb") as fin:
            self._write(uri, lambda f: shutil.copyfileobj(fin, f, COPY_CHUNK), overwrite=overwrite)

    def _write(self, uri: str, fill: Callable[[IO[bytes]], object], *, overwrite: bool) -> None:
        path = local_path(uri)
        with os_errors(uri):
            if overwrite:
                atomic_replace(path, fill)
            else:
                atomic_create(path, fill, uri)


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


def atomic_replace(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Write the file at path through `fill` into a synced temp file beside it, then rename it over path: readers
    see the old file or the new one, never part of one."""
    tmp = _fill_temp(path, fill)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_create(path: Path, fill: Callable[[IO[bytes]], object], uri: str) -> None:
    """Publish a complete file only if none exists: link(2) fails if the name is taken, so one writer wins."""
    if path.exists():
        raise already_exists(uri)
    tmp = _fill_temp(path, fill)
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise already_exists(uri) from exc
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
        raise already_exists(uri) from exc
    with os.fdopen(fd, "wb") as out, tmp.open("rb") as fin:
        shutil.copyfileobj(fin, out, COPY_CHUNK)

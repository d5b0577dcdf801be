"""Object URIs: s3://bucket/key, file:// URIs and plain paths; joining them, and whether one lies under a root."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from core.storage.errors import InvalidURI


def is_s3(uri: str) -> bool:
    """Whether uri is an s3:// URI."""
    return uri[:5].lower() == "s3://"


def is_file_uri(uri: str) -> bool:
    """Whether uri is a file:// URI."""
    return uri[:7].lower() == "file://"


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


def local_path(uri: str) -> Path:
    """The filesystem path for a plain path or a file:// URI."""
    if is_file_uri(uri):
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise InvalidURI(uri, f"{uri!r} names a remote host; use file:///absolute/path")
        return Path(urllib.parse.unquote(parts.path))
    return Path(uri).expanduser()


def check_scheme(uri: str) -> None:
    """Refuse (InvalidURI) a URI whose scheme no store handles: only paths, file:// and s3:// are objects."""
    if is_s3(uri):
        return
    scheme = urllib.parse.urlsplit(uri).scheme
    # A one-letter scheme is a Windows drive ("C:\\data"), not a URL.
    if scheme and scheme.lower() != "file" and len(scheme) > 1:
        raise InvalidURI(uri, f"{uri!r}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")


def matches_suffixes(name: str, suffixes: tuple[str, ...] | None) -> bool:
    """Whether name ends with one of suffixes (any case); True when suffixes is None."""
    if suffixes is None:
        return True
    lower = name.lower()
    return any(lower.endswith(s.lower()) for s in suffixes)


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
            if local_path(uri).resolve().is_relative_to(Path(root).expanduser().resolve()):
                return True
        except (OSError, ValueError):
            return False
    return False

"""S3Store against a real S3 server over HTTP (moto's server mode), configured as a user would."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from core.settings import Settings
from core.storage import (
    TMP_PREFIX,
    AlreadyExists,
    BucketNotFound,
    ObjectNotFound,
    S3Store,
    StorageUnavailable,
    join_uri,
    store_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3_settings: Settings) -> S3Store:
    # Built from the environment, as the worker and the trainer build theirs.
    s3 = store_for("s3://any")
    assert isinstance(s3, S3Store)
    return s3


def test_what_is_written_reads_back_and_an_overwrite_replaces_it(store: S3Store, s3_bucket: str) -> None:
    uri = join_uri(s3_bucket, "samples", "S1", "cell_1.bmp")
    assert not store.exists(uri)
    store.write_bytes(uri, b"BM cell")
    assert store.exists(uri)
    assert store.read_bytes(uri) == b"BM cell"
    store.write_bytes(uri, b"BM other")
    assert store.read_bytes(uri) == b"BM other"


def test_list_with_a_prefix(store: S3Store, s3_bucket: str) -> None:
    keys = ["data/fold_0/all/1.bmp", "data/fold_0/hem/2.bmp", "data/labels.csv", "data2/x.bmp", "other.bmp"]
    for key in keys:
        store.write_bytes(join_uri(s3_bucket, key), key.encode())
    under_data = [join_uri(s3_bucket, k) for k in keys[:3]]
    assert store.list(join_uri(s3_bucket, "data")) == under_data
    assert store.list(join_uri(s3_bucket, "data/")) == under_data
    assert store.list(join_uri(s3_bucket, "data"), suffixes=(".bmp",)) == under_data[:2]
    assert store.list(s3_bucket) == sorted(join_uri(s3_bucket, k) for k in keys)
    assert store.list(join_uri(s3_bucket, "absent")) == []


def test_list_follows_every_page(store: S3Store, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # S3 answers at most 1000 keys a request; small pages show the same thing without writing thousands.
    pages = []
    real_get_paginator = store.client.get_paginator

    def small_pages(name: str) -> Any:
        paginator = real_get_paginator(name)
        paginate = paginator.paginate

        def paginate_in_twos(**kwargs: Any) -> Any:
            for page in paginate(PaginationConfig={"PageSize": 2}, **kwargs):
                pages.append(page)
                yield page

        paginator.paginate = paginate_in_twos
        return paginator

    monkeypatch.setattr(store.client, "get_paginator", small_pages)
    uris = [join_uri(s3_bucket, "many", f"{i}.bmp") for i in range(7)]
    for uri in uris:
        store.write_bytes(uri, b"")
    assert store.list(join_uri(s3_bucket, "many")) == sorted(uris)
    assert len(pages) == 4


def test_overwrite_false_is_refused(store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    uri = join_uri(s3_bucket, "models", "cnn", "v1", "model.keras")
    store.write_bytes(uri, b"first", overwrite=False)
    with pytest.raises(AlreadyExists, match="already exists"):
        store.write_bytes(uri, b"second", overwrite=False)
    src = tmp_path / "model.keras"
    src.write_bytes(b"third")
    with pytest.raises(AlreadyExists):
        store.upload(src, uri, overwrite=False)
    assert store.read_bytes(uri) == b"first"
    fresh = join_uri(s3_bucket, "models", "cnn", "v2", "model.keras")
    store.upload(src, fresh, overwrite=False)
    assert store.read_bytes(fresh) == b"third"


def test_a_missing_key_is_object_not_found(store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    uri = join_uri(s3_bucket, "nothing.bmp")
    with pytest.raises(ObjectNotFound, match=r"nothing\.bmp"):
        store.read_bytes(uri)
    dest = tmp_path / "nothing.bmp"
    with pytest.raises(ObjectNotFound):
        store.download(uri, dest)
    assert not dest.exists()
    assert store.exists(uri) is False


def test_a_missing_bucket_is_bucket_not_found(store: S3Store, s3_settings: Settings, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-allscore/x.bmp"
    with pytest.raises(BucketNotFound, match="no-such-bucket-allscore") as caught:
        store.read_bytes(uri)
    assert str(s3_settings.s3_endpoint_url) in str(caught.value)
    with pytest.raises(BucketNotFound):
        store.write_bytes(uri, b"x")
    with pytest.raises(BucketNotFound):
        store.list("s3://no-such-bucket-allscore/data")
    with pytest.raises(BucketNotFound):
        store.exists(uri)


@pytest.mark.parametrize("parts", ["single", "multipart"])
def test_a_large_object_streams_to_a_file(
    store: S3Store, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: str
) -> None:
    if parts == "multipart":
        # 20 MB in 5 MiB parts (S3's minimum): a multipart upload, then parallel ranged GETs.
        monkeypatch.setattr(store, "multipart_threshold", 5 * 1024 * 1024)
        monkeypatch.setattr(store, "multipart_chunksize", 5 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    uri = join_uri(s3_bucket, "models", "big", "model.keras")
    store.upload(src, uri)
    head = store.client.head_object(Bucket=s3_bucket[5:], Key="models/big/model.keras")
    # A multipart object's ETag ends in -<number of parts>.
    assert head["ETag"].strip('"').endswith("-4") == (parts == "multipart")
    dest = tmp_path / "cache" / "big" / "model.keras"
    assert store.download(uri, dest) == dest
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert [p for p in dest.parent.iterdir() if p.name.startswith(TMP_PREFIX)] == []


def test_a_download_replaces_an_existing_file_whole(store: S3Store, s3_bucket: str, tmp_path: Path) -> None:
    uri = join_uri(s3_bucket, "a.bin")
    store.write_bytes(uri, b"new content")
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old content that is longer")
    store.download(uri, dest)
    assert dest.read_bytes() == b"new content"


def test_a_server_that_is_down_is_unavailable_quickly(s3_settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # Nothing listens on the port now: every connection is refused at once.
    settings = s3_settings.model_copy(
        update={
            "s3_endpoint_url": dead,
            "s3_max_attempts": 2,
            "s3_connect_timeout": 1.0,
            "s3_read_timeout": 2.0,
        }
    )
    store = S3Store(settings)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=re.escape(dead)) as caught:
        store.read_bytes("s3://bucket/cell.bmp")
    assert time.monotonic() - started < 10
    assert "retry" in str(caught.value)
    with pytest.raises(StorageUnavailable):
        store.exists("s3://bucket/cell.bmp")
    with pytest.raises(StorageUnavailable):
        store.download("s3://bucket/cell.bmp", tmp_path / "cell.bmp")
    assert list(tmp_path.iterdir()) == []

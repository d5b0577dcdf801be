"""Object storage: LocalStore on real folders, URI helpers, and S3 error mapping with a stubbed client."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.stub import Stubber

from core.errors import AllscoreError
from core.settings import Settings
from core.storage import (
    TMP_PREFIX,
    AlreadyExists,
    BucketNotFound,
    InvalidURI,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    StorageUnavailable,
    StoreDenied,
    is_s3,
    join_uri,
    parse_s3,
    store_for,
)
from core.storage.errors import from_os_error


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)]


@pytest.fixture(params=["path", "file-uri"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store root given as a plain path and as a file:// URI (with a space, to exercise quoting)."""
    folder = tmp_path / "model store"
    return str(folder) if request.param == "path" else folder.as_uri()


def test_round_trip_creates_parent_folders(root: str) -> None:
    store = LocalStore()
    uri = join_uri(root, "cnn", "v1", "model.keras")
    store.write_bytes(uri, b"weights")
    assert store.read_bytes(uri) == b"weights"
    assert store.exists(uri)
    assert not store.exists(join_uri(root, "cnn", "v2", "model.keras"))
    # A folder is not an object.
    assert not store.exists(join_uri(root, "cnn"))


def test_overwrite_replaces_by_default(root: str) -> None:
    store = LocalStore()
    uri = join_uri(root, "aliases", "production.json")
    store.write_bytes(uri, b'{"version": "1"}')
    store.write_bytes(uri, b'{"version": "2"}')
    assert store.read_bytes(uri) == b'{"version": "2"}'


def test_overwrite_false_refuses_an_existing_object(root: str, tmp_path: Path) -> None:
    store = LocalStore()
    uri = join_uri(root, "cnn", "v1", "manifest.json")
    store.write_bytes(uri, b"first", overwrite=False)
    with pytest.raises(AlreadyExists, match="already exists") as caught:
        store.write_bytes(uri, b"second", overwrite=False)
    assert caught.value.uri == uri
    assert store.read_bytes(uri) == b"first"
    assert leftovers(tmp_path) == []


def test_only_one_of_many_concurrent_creators_wins(tmp_path: Path) -> None:
    store = LocalStore()
    uri = str(tmp_path / "v1" / "model.keras")
    writers = 8
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []

    def publish(i: int) -> None:
        payload = f"writer-{i}".encode() * 10_000
        barrier.wait()
        try:
            store.write_bytes(uri, payload, overwrite=False)
            outcomes.append(f"won-{i}")
        except AlreadyExists:
            outcomes.append("refused")

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("refused") == writers - 1
    winner = winners[0].removeprefix("won-")
    # The file holds the winner's complete content, not a mix.
    assert store.read_bytes(uri) == f"writer-{winner}".encode() * 10_000
    assert leftovers(tmp_path) == []


def test_reading_a_missing_object_names_it(root: str) -> None:
    uri = join_uri(root, "nothing.bmp")
    with pytest.raises(ObjectNotFound, match=r"nothing\.bmp") as caught:
        LocalStore().read_bytes(uri)
    assert isinstance(caught.value, StorageError)
    assert isinstance(caught.value, AllscoreError)


def test_reading_a_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is a folder"):
        LocalStore().read_bytes(str(tmp_path))


def test_list_is_recursive_sorted_and_filtered(root: str) -> None:
    store = LocalStore()
    names = ["fold_0/all/b.bmp", "fold_0/hem/a.BMP", "fold_1/all/c.bmp", "labels.csv", "z.bmp"]
    for name in reversed(names):
        store.write_bytes(join_uri(root, name), name.encode())
    listed = store.list(root)
    assert listed == sorted(listed)
    assert listed == sorted(join_uri(root, name) for name in names)
    images = store.list(root, suffixes=(".bmp",))
    assert [u.rsplit("/", 1)[-1] for u in images] == ["b.bmp", "a.BMP", "c.bmp", "z.bmp"]
    # Every listed URI reads back, in the form the prefix was given.
    for uri in images:
        assert store.read_bytes(uri).endswith(uri.rsplit("/", 1)[-1].encode())
    assert store.list(join_uri(root, "fold_1")) == [join_uri(root, "fold_1/all/c.bmp")]


def test_list_quotes_names_in_file_uris(tmp_path: Path) -> None:
    store = LocalStore()
    store.write_bytes(str(tmp_path / "cells" / "cell 50%.bmp"), b"x")
    [uri] = store.list((tmp_path / "cells").as_uri())
    assert uri.startswith("file://") and " " not in uri
    assert store.read_bytes(uri) == b"x"


def test_list_of_a_missing_folder_is_empty(root: str) -> None:
    assert LocalStore().list(join_uri(root, "absent")) == []


def test_list_hides_unfinished_writes(tmp_path: Path) -> None:
    (tmp_path / f"{TMP_PREFIX}model.keras.abc").write_bytes(b"half")
    (tmp_path / "done.bmp").write_bytes(b"x")
    assert LocalStore().list(str(tmp_path)) == [str(tmp_path / "done.bmp")]


def test_download_streams_to_a_new_file(root: str, tmp_path: Path) -> None:
    store = LocalStore()
    uri = join_uri(root, "cnn", "v1", "model.keras")
    payload = bytes(range(256)) * 40_000
    store.write_bytes(uri, payload)
    dest = tmp_path / "cache" / "cnn" / "v1" / "model.keras"
    assert store.download(uri, dest) == dest
    assert dest.read_bytes() == payload


def test_download_of_a_missing_object_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "cache" / "model.keras"
    with pytest.raises(ObjectNotFound):
        LocalStore().download(str(tmp_path / "absent.keras"), dest)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_upload_copies_a_file_and_respects_overwrite(root: str, tmp_path: Path) -> None:
    store = LocalStore()
    src = tmp_path / "model.keras"
    src.write_bytes(b"v1 weights")
    uri = join_uri(root, "cnn", "v1", "model.keras")
    store.upload(src, uri, overwrite=False)
    assert store.read_bytes(uri) == b"v1 weights"
    src.write_bytes(b"other weights")
    with pytest.raises(AlreadyExists):
        store.upload(src, uri, overwrite=False)
    assert store.read_bytes(uri) == b"v1 weights"
    store.upload(src, uri)
    assert store.read_bytes(uri) == b"other weights"


def test_upload_of_a_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match=r"absent\.keras"):
        LocalStore().upload(tmp_path / "absent.keras", str(tmp_path / "out.keras"))


# --- URIs and store selection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket", ("models", "cnn/v1", "model.keras"), "s3://bucket/models/cnn/v1/model.keras"),
        ("s3://bucket/", ("/models/",), "s3://bucket/models"),
        ("/data/store", ("a", "", "b"), "/data/store/a/b"),
        ("file:///data", ("x.bmp",), "file:///data/x.bmp"),
        ("file:///", ("x.bmp",), "file:///x.bmp"),
        ("relative/dir", ("x",), "relative/dir/x"),
        ("s3://bucket/p", (), "s3://bucket/p"),
    ],
)
def test_join_uri(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_uri(base, *parts) == expected


def test_parse_s3() -> None:
    assert parse_s3("s3://bucket/a/b.bmp") == ("bucket", "a/b.bmp")
    assert parse_s3("s3://bucket") == ("bucket", "")
    # '?' and '#' are legal in keys and must not be taken for a query or fragment.
    assert parse_s3("s3://bucket/cell?1#2.bmp") == ("bucket", "cell?1#2.bmp")
    assert is_s3("S3://bucket/x") and not is_s3("/tmp/s3://x")
    for bad in ("s3://", "s3:///key", "/tmp/x", "file:///x"):
        with pytest.raises(InvalidURI):
            parse_s3(bad)


def test_store_for_picks_by_scheme() -> None:
    assert isinstance(store_for("/data/cells"), LocalStore)
    assert isinstance(store_for("file:///data/cells"), LocalStore)
    s3 = store_for("s3://bucket/models", Settings(s3_endpoint_url="http://127.0.0.1:1"))
    assert isinstance(s3, S3Store)
    assert isinstance(s3, ObjectStore) and isinstance(LocalStore(), ObjectStore)
    with pytest.raises(InvalidURI, match="unsupported scheme"):
        store_for("https://example.org/cell.bmp")


def test_file_uri_with_a_remote_host_is_refused() -> None:
    with pytest.raises(InvalidURI, match="remote host"):
        LocalStore().read_bytes("file://fileserver/share/x.bmp")


# --- S3 error mapping (no server: botocore's Stubber answers for S3) --------------------------------------


@pytest.fixture
def client() -> Any:
    """A real boto3 S3 client that never reaches a server (the tests answer for it)."""
    return boto3.session.Session().client(
        "s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )


@pytest.fixture
def stubbed(client: Any) -> tuple[S3Store, Stubber]:
    stubber = Stubber(client)
    stubber.activate()
    return S3Store(Settings(), client=client), stubber


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        ("NoSuchKey", 404, ObjectNotFound),
        ("", 404, ObjectNotFound),
        ("NoSuchBucket", 404, BucketNotFound),
        ("PreconditionFailed", 412, AlreadyExists),
        ("ConditionalRequestConflict", 409, StorageUnavailable),
        ("SlowDown", 503, StorageUnavailable),
        ("InternalError", 500, StorageUnavailable),
        ("", 502, StorageUnavailable),
        ("AccessDenied", 403, StoreDenied),
        ("InvalidAccessKeyId", 403, StoreDenied),
        ("", 403, StoreDenied),
        ("InvalidArgument", 400, StorageError),
    ],
    ids=lambda v: str(v.__name__ if isinstance(v, type) else v or "no code"),
)
def test_s3_errors_become_typed_errors(
    stubbed: tuple[S3Store, Stubber], code: str, status: int, error: type[StorageError]
) -> None:
    store, stubber = stubbed
    stubber.add_client_error("get_object", service_error_code=code, http_status_code=status)
    with pytest.raises(StorageError, match=r"s3://b/k\.bmp") as caught:
        store.read_bytes("s3://b/k.bmp")
    assert type(caught.value) is error, caught.value
    # Retrying is for transient failures only: a worker must not retry a refusal forever.
    assert isinstance(caught.value, StorageUnavailable) == (error is StorageUnavailable)


def _raises(exc: Exception) -> Callable[..., object]:
    def call(*args: object, **kwargs: object) -> object:
        raise exc

    return call


@pytest.mark.parametrize(
    ("failure", "error", "told"),
    [
        (botocore.exceptions.NoCredentialsError(), StoreDenied, "no usable AWS credentials"),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.invalid"), StorageUnavailable,
         "cannot reach"),
        (botocore.exceptions.SSLError(endpoint_url="https://s3.invalid", error="bad certificate"), StorageError,
         "TLS failure"),
        (botocore.exceptions.ParamValidationError(report="Bucket name too long"), InvalidURI, "invalid S3 request"),
    ],
    ids=["no credentials", "unreachable", "TLS", "invalid request"],
)  # fmt: skip
def test_botocore_failures_become_typed_errors(
    client: Any, monkeypatch: pytest.MonkeyPatch, failure: Exception, error: type[StorageError], told: str
) -> None:
    monkeypatch.setattr(client, "get_object", _raises(failure))
    with pytest.raises(StorageError, match=told) as caught:
        S3Store(Settings(), client=client).read_bytes("s3://b/k.bmp")
    assert type(caught.value) is error and caught.value.uri == "s3://b/k.bmp"
    assert caught.value.__cause__ is failure


def test_an_error_botocore_does_not_raise_passes_unchanged(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "get_object", _raises(KeyError("a bug, not a storage failure")))
    with pytest.raises(KeyError):
        S3Store(Settings(), client=client).read_bytes("s3://b/k.bmp")


@pytest.mark.parametrize(
    ("failure", "error", "told"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/a.bmp"), ObjectNotFound,
         "no such file (/data/a.bmp)"),
        (IsADirectoryError(errno.EISDIR, "Is a directory"), StorageError, "is a folder"),
        (PermissionError(errno.EACCES, "Permission denied"), StorageError, "permission denied"),
        (OSError(errno.ENOSPC, "No space left on device"), StorageError, "No space left on device"),
    ],
    ids=["missing", "folder", "permission", "disk full"],
)  # fmt: skip
def test_os_errors_become_typed_errors(failure: OSError, error: type[StorageError], told: str) -> None:
    converted = from_os_error(failure, "/data/a.bmp")
    assert type(converted) is error and told in str(converted) and converted.uri == "/data/a.bmp"


def test_a_failed_precondition_is_already_exists(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    stubber.add_client_error(
        "put_object",
        service_error_code="PreconditionFailed",
        http_status_code=412,
        expected_params={"Bucket": "b", "Key": "m/v1/model.keras", "Body": b"x", "IfNoneMatch": "*"},
    )
    with pytest.raises(AlreadyExists):
        store.write_bytes("s3://b/m/v1/model.keras", b"x", overwrite=False)
    stubber.assert_no_pending_responses()


def test_an_endpoint_without_conditional_puts_falls_back_to_check_then_put(
    stubbed: tuple[S3Store, Stubber],
) -> None:
    store, stubber = stubbed
    stubber.add_client_error("put_object", service_error_code="NotImplemented", http_status_code=501)
    stubber.add_response("head_object", {}, {"Bucket": "b", "Key": "k"})
    with pytest.raises(AlreadyExists):
        store.write_bytes("s3://b/k", b"x", overwrite=False)
    stubber.add_client_error("put_object", service_error_code="NotImplemented", http_status_code=501)
    stubber.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stubber.add_response("head_bucket", {}, {"Bucket": "b"})
    stubber.add_response("put_object", {}, {"Bucket": "b", "Key": "k", "Body": b"x"})
    store.write_bytes("s3://b/k", b"x", overwrite=False)
    stubber.assert_no_pending_responses()


def test_exists_tells_a_missing_bucket_from_a_missing_key(stubbed: tuple[S3Store, Stubber]) -> None:
    store, stubber = stubbed
    stubber.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stubber.add_response("head_bucket", {})
    assert store.exists("s3://b/k") is False
    stubber.add_client_error("head_object", service_error_code="404", http_status_code=404)
    stubber.add_client_error("head_bucket", service_error_code="404", http_status_code=404)
    with pytest.raises(BucketNotFound, match="'b'"):
        store.exists("s3://b/k")


def test_an_s3_uri_without_a_key_is_not_an_object() -> None:
    store = S3Store(Settings())
    with pytest.raises(InvalidURI, match="not an object"):
        store.read_bytes("s3://bucket")
    with pytest.raises(InvalidURI, match="not an object"):
        store.write_bytes("s3://bucket/folder/", b"x")


def test_the_client_is_built_lazily_from_settings() -> None:
    store = S3Store(Settings(s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-2", s3_max_attempts=2))
    assert store._client_obj is None
    client = store.client
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "eu-west-2"
    assert client.meta.config.s3["addressing_style"] == "path"
    # Two attempts in all: the first try and one retry.
    assert client.meta.config.retries == {"total_max_attempts": 2, "mode": "standard"}
    assert store.client is client


def test_store_init_creates_a_local_store_folder_once(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from allscore.cli import app

    folder = tmp_path / "model store"  # a space: the file:// URI quotes it as %20
    first = CliRunner().invoke(app, ["store", "init", folder.as_uri()])
    assert first.exit_code == 0, first.output
    assert folder.is_dir() and first.output.strip().endswith("created")
    assert not (tmp_path / "model%20store").exists()
    again = CliRunner().invoke(app, ["store", "init", str(folder)])
    assert again.exit_code == 0 and again.output.strip().endswith("exists")

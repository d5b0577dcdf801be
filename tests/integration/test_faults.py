"""Issue 6: faults and bad input lose nothing. Real Redis, PostgreSQL, moto S3 over HTTP and real workers.

Each test injects one fault an operator can meet (a killed process, a restarted broker, a database or S3 server
that goes away, a swapped model, bad images, bad submissions, a hostile message, a burst of load) and then checks
what an operator would check: the rows of the views `sample_results` and `cell_results`, their status and counts.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.artifact import ModelError
from core.errors import AllscoreError
from core.settings import get_settings, reset_settings_cache
from core.storage import BucketNotFound, store_for
from db.engine import parse_url
from tests.fixtures import PublishedModel
from tests.harness.faults import RedisServer, wait_until
from tests.helpers import require_service
from tests.integration.stack import Stack, children
from worker.client import SubmitError, submit_samples

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _db_port(url: str) -> int:
    return int(parse_url(url).port or 5432)


# -- 1. a worker child killed with SIGKILL mid-sample ---------------------------------------------------------


@pytest.mark.timeout(150)
def test_sigkill_of_a_worker_child_mid_sample_redelivers_it_exactly_once(stack: Stack) -> None:
    prefix = stack.upload_sample("slide-k", 40)
    s3 = stack.s3_proxy()
    worker = stack.start_worker(concurrency=1, ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}")
    # Frozen S3: the sample starts (status running) and then hangs on its first image.
    s3.freeze()
    job = stack.submit({"slide-k": [prefix]})
    wait_until(lambda: stack.sample("slide-k")["status"] == "running", 60, "the sample to start")
    assert stack.cell_count("slide-k") == 0
    assert worker.proc is not None
    (child,) = children(worker.proc.pid)
    os.kill(child, signal.SIGKILL)
    s3.thaw()

    rows = stack.wait_final(job, 1, 90)
    row = stack.sample("slide-k")
    assert (rows["slide-k"]["status"], row["n_cells"], row["n_failed"]) == ("done", 40, 0), row
    assert row["attempts"] == 2, "the killed run and the redelivered one"
    assert stack.cell_count("slide-k") == 40
    assert stack.duplicate_cells() == 0
    assert worker.proc.poll() is None, "the worker survives the loss of a child"
    assert child not in children(worker.proc.pid)
    assert stack.logs().count("sample slide-k: 40 cells") == 1, "scored to completion exactly once"


# -- 2. the worker stopped with SIGTERM mid-run ------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_sigterm_mid_run_requeues_in_flight_work_which_finishes_after_a_restart(stack: Stack) -> None:
    names = [f"slide-t{i}" for i in range(4)]
    prefixes = {name: stack.upload_sample(name, 24, seed=i) for i, name in enumerate(names)}
    s3 = stack.s3_proxy()
    env = {"ALLSCORE_S3_ENDPOINT_URL": f"http://{s3.url_host}", "ALLSCORE_WORKER_SHUTDOWN_GRACE": "3"}
    worker = stack.start_worker(concurrency=2, **env)
    s3.freeze()
    job = stack.submit({name: [prefixes[name]] for name in names})
    wait_until(lambda: sum(r["status"] == "running" for r in stack.rows(job).values()) == 2, 60, "two samples to start")
    in_flight = {s for s, r in stack.rows(job).items() if r["status"] == "running"}
    assert stack.queued_messages() == 2

    assert worker.proc is not None
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    # Stops by itself, although its two samples hang: they are handed back, not waited for.
    worker.proc.wait(timeout=30)
    stopped_in = time.monotonic() - started
    assert stack.queued_messages() == 4, "the two in-flight samples went back to the queue"
    assert {r["status"] for r in stack.rows(job).values()} <= {"queued", "running"}

    s3.thaw()
    stack.start_worker(concurrency=2, **env)
    rows = stack.wait_final(job, 4, 90)
    assert {r["status"] for r in rows.values()} == {"done"}, rows
    for name in names:
        assert (stack.sample(name)["n_cells"], stack.cell_count(name)) == (24, 24)
        assert stack.sample(name)["attempts"] == (2 if name in in_flight else 1)
    assert stack.duplicate_cells() == 0
    assert stopped_in < 20, stopped_in


# -- 3. Redis restarts while samples are queued and running ---------------------------------------------------


@pytest.mark.timeout(180)
def test_redis_restart_with_samples_queued_and_running_loses_nothing(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        broker = RedisServer(tmp_path / "redis").start()
    except (FileNotFoundError, RuntimeError) as exc:
        require_service("redis-server", False, str(exc))
        raise
    try:
        stack.use_broker(broker.url, monkeypatch)
        names = [f"slide-r{i}" for i in range(5)]
        prefixes = {name: stack.upload_sample(name, 24, seed=i) for i, name in enumerate(names)}
        s3 = stack.s3_proxy()
        worker = stack.start_worker(concurrency=2, ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}")
        s3.freeze()
        job = stack.submit({name: [prefixes[name]] for name in names})
        wait_until(
            lambda: sum(r["status"] == "running" for r in stack.rows(job).values()) == 2, 60, "two samples to start"
        )
        assert stack.broker_keys()["queued"] == 3

        broker.restart()
        # The queued messages survived the restart in the append-only file.
        assert sum(stack.broker_keys().values()) >= 3, stack.broker_keys()
        wait_until(lambda: worker.log().count("Connected to redis://") >= 2, 60, "the worker to reconnect")
        s3.thaw()

        rows = stack.wait_final(job, len(names), 120)
        assert {r["status"] for r in rows.values()} == {"done"}, rows
        for name in names:
            assert (stack.sample(name)["n_cells"], stack.cell_count(name)) == (24, 24), name
        assert stack.duplicate_cells() == 0
        assert worker.proc is not None and worker.proc.poll() is None
        # Nothing is left for a later redelivery either.
        wait_until(lambda: stack.broker_keys() == {"queued": 0, "unacked": 0}, 20, "the broker to drain")
    finally:
        for w in stack.workers:
            w.stop(timeout=20)
        broker.stop()


# -- 4. PostgreSQL unreachable for a while -------------------------------------------------------------------


class PartialWatch:
    """Reads the views every 0.2 s in a thread and records any moment an analyst could see a partial sample."""

    def __init__(self, stack: Stack, job_id: str) -> None:
        import threading

        self.stack = stack
        self.job_id = job_id
        self.seen: list[tuple[str, str, int | None, int]] = []
        self.violations: list[tuple[str, str, int | None, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            # One statement, so one snapshot: a sample row and its cells are read together.
            for r in self.stack.query(
                "SELECT r.sample_id, r.status, r.n_cells, (SELECT count(*) FROM cell_results c "
                "WHERE c.sample_id = r.sample_id AND c.model_version = r.model_version) AS cells "
                "FROM sample_results r WHERE r.job_id = :job",
                job=self.job_id,
            ):
                state = (r["sample_id"], r["status"], r["n_cells"], int(r["cells"]))
                self.seen.append(state)
                complete = r["status"] == "done" and r["n_cells"] == state[3]
                empty = r["status"] != "done" and state[3] == 0
                if not (complete or empty):
                    self.violations.append(state)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.mark.timeout(180)
def test_postgresql_unreachable_for_a_while_retries_and_every_sample_ends_done(stack: Stack) -> None:
    names = [f"slide-p{i}" for i in range(3)]
    prefixes = {name: stack.upload_sample(name, 24, seed=i) for i, name in enumerate(names)}
    s3 = stack.s3_proxy()
    db = stack.proxy(_db_port(stack.pg_url))
    db_via_proxy = parse_url(stack.pg_url).set(host="127.0.0.1", port=db.port)
    worker = stack.start_worker(
        concurrency=2,
        ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}",
        ALLSCORE_DATABASE_URL=db_via_proxy.render_as_string(hide_password=False),
        # Fewer retries than the outage lasts: a sample whose failure cannot be recorded must not be dropped.
        ALLSCORE_TASK_MAX_RETRIES="2",
    )
    s3.freeze()
    job = stack.submit({name: [prefixes[name]] for name in names})
    watch = PartialWatch(stack, job)
    try:
        wait_until(
            lambda: sum(r["status"] == "running" for r in stack.rows(job).values()) == 2, 60, "two samples to start"
        )
        # The database goes away while two samples are being scored and one waits in the queue.
        db.down()
        s3.thaw()
        wait_until(lambda: worker.log().count("transient fault") >= 6, 60, "the workers to retry")
        time.sleep(3)
        rows = stack.rows(job)
        assert {r["status"] for r in rows.values()} <= {"queued", "running"}, rows
        db.up()
        rows = stack.wait_final(job, len(names), 90)
    finally:
        watch.stop()
    assert {r["status"] for r in rows.values()} == {"done"}, rows
    for name in names:
        assert (stack.sample(name)["n_cells"], stack.cell_count(name)) == (24, 24), name
    assert stack.duplicate_cells() == 0
    assert watch.violations == [], watch.violations[:5]
    assert len(watch.seen) > 20
    assert db.connections > 0


# -- 5. the S3 server is down -----------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_s3_down_fails_the_sample_with_a_clear_reason_and_resubmitting_works(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.artifact import Registry

    # As in production, the model store is on S3 too: the outage hits the model's download and the images'.
    models = f"{stack.bucket}/models"
    Registry(models).publish(*Registry(stack.model.store).fetch(stack.model.ref))
    monkeypatch.setenv("ALLSCORE_MODEL_STORE", models)
    reset_settings_cache()
    prefix = stack.upload_sample("slide-s", 24)
    s3 = stack.s3_proxy()
    endpoint = f"http://{s3.url_host}"
    worker = stack.start_worker(
        concurrency=1, ALLSCORE_S3_ENDPOINT_URL=endpoint, ALLSCORE_MODEL_STORE=models, ALLSCORE_TASK_MAX_RETRIES="2"
    )

    def outage(sample_id: str, where: str) -> None:
        """S3 down: the sample retries, then fails saying why; S3 back: resubmitting it works."""
        s3.down()
        job = stack.submit({sample_id: [prefix]})
        (row,) = stack.wait_final(job, 1, 90).values()
        assert row["status"] == "failed", row
        assert "gave up after 2 retries" in row["error"] and where in row["error"], row["error"]
        assert "cannot reach" in row["error"] and endpoint in row["error"], row["error"]
        assert "check that the S3 server is up" in row["error"]
        assert row["n_cells"] is None and stack.cell_count(sample_id) == 0
        assert worker.log().count(f"{sample_id}: transient fault") == 2
        s3.up()
        job = stack.submit({sample_id: [prefix]})
        (row,) = stack.wait_final(job, 1, 60).values()
        assert (row["status"], row["n_cells"], row["n_failed"], row["error"]) == ("done", 24, 0, None), row
        assert stack.cell_count(sample_id) == 24
        assert len(stack.query("SELECT 1 FROM sample_results WHERE sample_id = :s", s=sample_id)) == 1

    outage("slide-s-before-model", f"{models}/tiny/v1/")  # the model cannot be downloaded
    outage("slide-s-model-loaded", f"{prefix}cell_")  # the model is loaded; the images cannot be read
    assert stack.duplicate_cells() == 0
    assert len(re.findall("model loaded: ", worker.log())) == 1


# -- 6. a corrupted or swapped model.keras, and a model carrying a Lambda layer ------------------------------


def _publish_variants(store: str, model: PublishedModel, tmp: Path) -> dict[str, str]:
    """Publish the tiny model as `good`, `corrupt` and `swapped` (bytes changed after publishing), and a
    `lambda` version whose model.keras (sha256 right) holds a Lambda layer; return name -> reference."""
    import keras

    from core.artifact import Registry, sha256_file
    from trainer.arch import build_model

    source, manifest = Registry(model.store).fetch(model.ref)
    registry = Registry(store)
    for version in ("good", "corrupt", "swapped"):
        registry.publish(source, manifest.model_copy(update={"version": version}))
    stored = Path(store) / manifest.name
    data = bytearray((stored / "corrupt" / "model.keras").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (stored / "corrupt" / "model.keras").write_bytes(bytes(data))
    other = tmp / "other.keras"
    build_model("tiny", manifest.input_size, seed=7).save(other)
    (stored / "swapped" / "model.keras").write_bytes(other.read_bytes())
    inputs = keras.Input((manifest.input_size, manifest.input_size, 3))
    hidden = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(hidden))
    lambda_file = tmp / "lambda.keras"
    keras.Model(inputs, outputs).save(lambda_file)
    registry.publish(lambda_file, manifest.model_copy(update={"version": "lambda", "sha256": sha256_file(lambda_file)}))
    return {v: f"{manifest.name}:{v}" for v in ("good", "corrupt", "swapped", "lambda")}


@pytest.mark.timeout(150)
def test_corrupt_or_swapped_model_is_refused_by_sha256_and_a_lambda_layer_by_safe_mode(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = str(tmp_path / "store-variants")
    refs = _publish_variants(store, stack.model, tmp_path)
    monkeypatch.setenv("ALLSCORE_MODEL_STORE", store)
    reset_settings_cache()
    prefix = stack.upload_sample("slide-m", 16)
    worker = stack.start_worker(concurrency=1, ALLSCORE_MODEL_STORE=store)
    jobs = {variant: stack.submit({f"slide-m-{variant}": [prefix]}, model_ref=ref) for variant, ref in refs.items()}
    rows = {variant: stack.wait_final(job, 1, 90)[f"slide-m-{variant}"] for variant, job in jobs.items()}

    assert (rows["good"]["status"], rows["good"]["n_cells"]) == ("done", 16), rows["good"]
    for variant in ("corrupt", "swapped"):
        row = rows[variant]
        assert row["status"] == "failed", row
        assert "sha256" in row["error"] and "does not match the manifest" in row["error"], row["error"]
        assert "corrupt or was swapped" in row["error"] and f"{variant}/model.keras" in row["error"]
        assert stack.cell_count(f"slide-m-{variant}") == 0
    assert rows["lambda"]["status"] == "failed" and "Lambda" in rows["lambda"]["error"], rows["lambda"]
    assert stack.cell_count("slide-m-lambda") == 0
    # A refused model is never loaded: only the good one was, and the worker goes on.
    assert re.findall(r"model loaded: (\S+) in pid", worker.log()) == [refs["good"]]
    assert worker.proc is not None and worker.proc.poll() is None


# -- 7. bad images inside a sample ---------------------------------------------------------------------------


def _image_kinds(tmp: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Every kind of image file the issue lists: the bytes to upload, and for the unreadable ones the reason
    their cell row must give."""
    import numpy as np
    from PIL import Image

    from tests.helpers import bmp_header_only, encode, png_header_only
    from trainer.synth import write_sample

    cells = [p.read_bytes() for p in write_sample(tmp / "kinds", 4, 0.5, seed=3, size=64)]
    rgb = np.asarray(Image.open(tmp / "kinds" / "cell_0001.bmp").convert("RGB"))
    gray16 = (rgb[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    big = np.asarray(Image.fromarray(rgb).resize((600, 600)))
    readable = {
        "good-1.bmp": cells[0],
        "good-2.bmp": cells[1],
        "grayscale.png": encode(Image.fromarray(rgb).convert("L"), "PNG"),
        "rgba.png": encode(Image.fromarray(rgb).convert("RGBA"), "PNG"),
        "sixteen-bit.png": encode(Image.fromarray(gray16), "PNG"),
        "sixteen-bit.tif": encode(Image.fromarray(gray16), "TIFF"),
        "c-nmc-final-600x600.bmp": encode(big, "BMP"),
        "photo.jpg": encode(rgb, "JPEG", quality=90),
    }
    unreadable = {
        "zero-bytes.bmp": (b"", "the file is empty"),
        "truncated.bmp": (cells[2][: len(cells[2]) // 3], "truncated or corrupt"),
        "wrong-magic.bmp": (b"XX" + cells[3][2:], "not a recognised image"),
        "report.png": (
            b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
            "not a recognised image",
        ),
        "one-pixel.bmp": (encode(rgb[:1, :1], "BMP"), "smaller than 8x8"),
        "bomb.bmp": (bmp_header_only(40_000, 40_000), "too large"),
        "bomb.png": (png_header_only(30_000, 30_000), "too large"),
    }
    files = {**readable, **{name: data for name, (data, _) in unreadable.items()}}
    reasons = {name: reason for name, (_, reason) in unreadable.items()}
    reasons["missing.bmp"] = "not found"
    return files, reasons


@pytest.mark.timeout(120)
def test_bad_images_get_an_error_on_their_cell_and_the_rest_of_the_sample_is_scored(
    stack: Stack, tmp_path: Path
) -> None:
    files, reasons = _image_kinds(tmp_path)
    store = store_for(stack.bucket)
    prefix = f"{stack.bucket}/mixed/"
    for name, data in files.items():
        store.write_bytes(prefix + name, data)
    stack.start_worker(concurrency=1)
    job = stack.submit({"slide-mixed": [prefix, prefix + "missing.bmp"]})
    row = stack.wait_final(job, 1, 90)["slide-mixed"]

    n_readable = len(files) - len(reasons) + 1
    assert row["status"] == "done", row
    assert (row["n_cells"], row["n_failed"]) == (len(files) + 1, len(reasons)), row
    cells = {
        r["image_uri"].rsplit("/", 1)[1]: r
        for r in stack.query("SELECT * FROM cell_results WHERE sample_id = 'slide-mixed'")
    }
    assert set(cells) == set(files) | {"missing.bmp"}
    for name, reason in reasons.items():
        assert cells[name]["p_all"] is None and cells[name]["is_all"] is None, name
        assert reason in (cells[name]["error"] or ""), (name, cells[name]["error"])
    scored = {name: c for name, c in cells.items() if name not in reasons}
    assert len(scored) == n_readable
    for name, cell in scored.items():
        assert cell["error"] is None and 0.0 <= cell["p_all"] <= 1.0, (name, cell)
    # The fraction is taken over the scored cells only.
    assert row["all_fraction"] == pytest.approx(sum(bool(c["is_all"]) for c in scored.values()) / n_readable)


# -- 8. bad submissions --------------------------------------------------------------------------------------


# Each case: what is wrong, the samples ({allowed}, {outside} and {bucket} stand for the test's folders and bucket;
# {prefix} is a real uploaded sample), whether the settings confine reads to the allowed roots, the model reference
# (None: the test's model), the error and what it must say.
REFUSALS: list[tuple[str, dict[str, list[str]], bool, str | None, type[Exception], str]] = [
    ("unknown model version", {"S1": ["{prefix}"]}, False, "tiny:no-such-version", ModelError, "no model manifest"),
    ("unknown model alias", {"S1": ["{prefix}"]}, False, "tiny@no-such-alias", ModelError, "no alias"),
    ("malformed model reference", {"S1": ["{prefix}"]}, False, "ti ny", ModelError, "bad name"),
    ("empty sample", {"S1": []}, False, None, SubmitError, "has no images"),
    ("folder without images", {"S1": ["{allowed}/empty"]}, False, None, SubmitError, "holds no image"),
    ("prefix without images", {"S1": ["{bucket}/nothing/"]}, False, None, SubmitError, "no image objects"),
    ("sample id too long", {"S" * 129: ["{prefix}"]}, False, None, SubmitError, "the limit is 128"),
    ("newline in sample id", {"S1\nS2": ["{prefix}"]}, False, None, SubmitError, "control characters"),
    ("NUL in sample id", {"S1\x00": ["{prefix}"]}, False, None, SubmitError, "control characters"),
    ("escape in sample id", {"S1\x1b[2J": ["{prefix}"]}, False, None, SubmitError, "control characters"),
    ("file outside the roots", {"S1": ["{outside}/secret.bmp"]}, True, None, SubmitError, "outside"),
    ("folder outside the roots", {"S1": ["{outside}"]}, True, None, SubmitError, "outside the allowed"),
    ("'..' out of a root", {"S1": ["{allowed}/slide/../../outside/secret.bmp"]}, True, None, SubmitError, "outside"),
    ("glob through '..'", {"S1": ["{allowed}/../outside/*.bmp"]}, True, None, SubmitError, "outside"),
    ("symlink out of a root", {"S1": ["{allowed}/slide"]}, True, None, SubmitError, "outside"),
    ("file:// outside the roots", {"S1": ["file://{outside}/secret.bmp"]}, True, None, SubmitError, "outside"),
    ("s3 prefix outside the roots", {"S1": ["{bucket}/other/"]}, True, None, SubmitError, "outside"),
    ("s3 look-alike prefix", {"S1": ["{bucket}/slides-evil/"]}, True, None, SubmitError, "outside"),
    ("bucket that does not exist", {"S1": ["s3://no-such-bucket-allscore/slides/"]}, False, None, BucketNotFound,
     "does not exist"),
    ("key in a bucket that does not exist", {"S1": ["s3://no-such-bucket-allscore/a.bmp"]}, False, None,
     BucketNotFound, "does not exist"),
    ("one bad sample among good ones", {"S1": ["{allowed}/slide/cell.bmp"], "S2": ["{allowed}/empty"]}, False, None,
     SubmitError, "holds no image"),
]  # fmt: skip


class _Lab:
    """A lab's files for the submit tests: allowed/slide (a cell and a symlink out), allowed/empty, outside/."""

    def __init__(self, stack: Stack, tmp_path: Path) -> None:
        self.allowed = tmp_path / "allowed"
        self.outside = tmp_path / "outside"
        self.prefix = stack.upload_sample("slide-ok", 4)
        self.bucket = stack.bucket
        for folder in (self.allowed / "slide", self.allowed / "empty", self.outside):
            folder.mkdir(parents=True, exist_ok=True)
        cell = next((tmp_path / "slides" / "slide-ok").glob("*.bmp")).read_bytes()
        (self.allowed / "slide" / "cell.bmp").write_bytes(cell)
        (self.outside / "secret.bmp").write_bytes(cell)
        (self.allowed / "slide" / "link.bmp").symlink_to(self.outside / "secret.bmp")
        (self.allowed / "empty" / "notes.txt").write_text("no images here")
        self.base = get_settings()
        self.confined = self.base.model_copy(update={"allowed_roots": [str(self.allowed), f"{self.bucket}/slides"]})

    def uris(self, samples: dict[str, list[str]]) -> dict[str, list[str]]:
        names = {"allowed": self.allowed, "outside": self.outside, "bucket": self.bucket, "prefix": self.prefix}
        return {sample: [uri.format(**names) for uri in uris] for sample, uris in samples.items()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("what", "samples", "confined", "model_ref", "error", "message"), REFUSALS,
                         ids=[case[0] for case in REFUSALS])  # fmt: skip
def test_a_bad_submission_is_refused_at_submit_time_and_nothing_is_queued(
    stack: Stack,
    tmp_path: Path,
    what: str,
    samples: dict[str, list[str]],
    confined: bool,
    model_ref: str | None,
    error: type[Exception],
    message: str,
) -> None:
    lab = _Lab(stack, tmp_path)
    settings = lab.confined if confined else lab.base
    with pytest.raises(error) as caught:
        submit_samples(lab.uris(samples), model_ref=model_ref or stack.model.ref, settings=settings)
    assert isinstance(caught.value, AllscoreError), what
    assert message in str(caught.value), (what, str(caught.value))
    # Nothing was recorded and nothing was queued.
    assert stack.query("SELECT count(*) AS n FROM sample_results")[0]["n"] == 0
    assert stack.query("SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    assert stack.queued_messages() == 0


@pytest.mark.timeout(60)
def test_confined_settings_take_a_good_submission(stack: Stack, tmp_path: Path) -> None:
    # The refusals above are about the input: the same confined settings take a good submission.
    lab = _Lab(stack, tmp_path)
    submit_samples({"S1": [str(lab.allowed / "slide" / "cell.bmp")]}, model_ref=stack.model.ref, settings=lab.confined)
    assert stack.queued_messages() == 1


# -- 9. hostile or malformed messages put straight on the queue ------------------------------------------------


class _Canary:
    """Unpickling this creates a file: proof that a pickled message ran code on the worker."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.path,))


@pytest.mark.timeout(120)
def test_pickled_or_malformed_messages_are_rejected_and_the_worker_goes_on(stack: Stack, tmp_path: Path) -> None:
    from kombu import Connection

    from worker.celery_app import TASK_NAME, app

    canary = tmp_path / "pickle-ran-code"
    prefix = stack.upload_sample("slide-after", 8)
    worker = stack.start_worker(concurrency=1)
    assert worker.proc is not None
    pid = worker.proc.pid
    uris = [prefix + "cell_0001.bmp"]
    shape = {"job_id": "j", "sample_id": "hostile", "image_uris": uris, "model_version": stack.model.ref}
    malformed: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        (("j", "hostile", uris, stack.model.ref), {}),
        ((), {k: v for k, v in shape.items() if k != "model_version"}),
        ((), {**shape, "image_uris": uris[0]}),
        ((), {**shape, "image_uris": []}),
        ((), {**shape, "sample_id": "x" * 200}),
        ((), {**shape, "sample_id": "hostile\r\n"}),
        ((), {**shape, "job_id": 42}),
    ]
    with Connection(stack.redis_url) as conn:
        app.send_task(
            TASK_NAME,
            kwargs={**shape, "image_uris": [_Canary(canary)]},
            serializer="pickle",
            queue=stack.queue,
            connection=conn,
        )
        for args, kwargs in malformed:
            app.send_task(TASK_NAME, args=args, kwargs=kwargs, queue=stack.queue, connection=conn)
        app.send_task("allscore.not_a_task", kwargs=shape, queue=stack.queue, connection=conn)
        producer = conn.Producer()
        headers = {"task": TASK_NAME, "id": uuid.uuid4().hex, "lang": "py", "retries": 0}
        producer.publish(
            b"{not json",
            routing_key=stack.queue,
            exchange=stack.queue,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
        )
        producer.publish({"hello": "no celery headers"}, routing_key=stack.queue, exchange=stack.queue)
        # A well-formed message for a sample nobody submitted.
        app.send_task(TASK_NAME, kwargs={**shape, "sample_id": "ghost"}, queue=stack.queue, connection=conn)
    wait_until(lambda: stack.broker_keys() == {"queued": 0, "unacked": 0}, 60, "the hostile messages to be consumed")

    job = stack.submit({"slide-after": [prefix]})
    row = stack.wait_final(job, 1, 60)["slide-after"]
    assert (row["status"], row["n_cells"]) == ("done", 8), row
    log = worker.log()
    assert not canary.exists(), "a pickled message ran code on the worker"
    assert "Refusing to deserialize untrusted content of type pickle" in log, log[-3000:]
    assert log.count("rejected message") == len(malformed), log[-3000:]
    assert "Received unregistered task of type 'allscore.not_a_task'" in log
    assert "Can't decode message body" in log and "Received and deleted unknown message" in log
    # Nothing about the hostile or ghost samples was written, and the same worker process went on working.
    assert stack.query("SELECT count(*) AS n FROM samples WHERE sample_id IN ('hostile', 'ghost')")[0]["n"] == 0
    assert worker.proc.poll() is None and worker.proc.pid == pid
    assert "Unrecoverable error" not in log and "WorkerLostError" not in log


# -- 10. secrets only from the environment; compose's Redis and PostgreSQL require passwords ----------------------
# (The read-only analyst role is tested in test_db.py::test_analyst_role_reads_the_views_and_cannot_write.)


@pytest.mark.timeout(90)
def test_every_compose_secret_must_come_from_the_environment(tmp_path: Path) -> None:
    import yaml

    from tests.harness.compose import compose_config
    from tests.helpers import REPO_ROOT

    example = (REPO_ROOT / ".env.example").read_text().splitlines()
    secrets = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in example
        if re.match(r"^[A-Z0-9_]*(PASSWORD|SECRET|ACCESS_KEY)[A-Z0-9_]*=", line)
    }
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "ALLSCORE_ANALYST_PASSWORD"} <= set(secrets), secrets
    for name in secrets:
        env_file = tmp_path / f"without-{name}.env"
        env_file.write_text("\n".join(ln for ln in example if not ln.startswith(f"{name}=")) + "\n")
        result = compose_config(env_file)
        assert result.returncode != 0 and name in result.stderr, (name, result.stderr[-500:])
    rendered = compose_config(REPO_ROOT / ".env.example")
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    redis_cmd = services["redis"]["command"]
    redis_cmd = " ".join(redis_cmd) if isinstance(redis_cmd, list) else redis_cmd
    assert f"--requirepass {secrets['REDIS_PASSWORD']}" in redis_cmd.replace('"', "")
    postgres = services["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"] == secrets["POSTGRES_PASSWORD"]
    assert postgres.get("POSTGRES_HOST_AUTH_METHOD", "") not in ("trust", "password")
    # No secret value is written into what is shipped: the compose file, the image or the code. (An access key
    # id is not a secret: the example's is the word "allscore".)
    secret_values = {name: value for name, value in secrets.items() if "ACCESS_KEY" not in name}
    shipped = [REPO_ROOT / "docker-compose.yml", REPO_ROOT / "Dockerfile"]
    for package in ("allscore", "core", "db", "trainer", "worker"):
        shipped += sorted((REPO_ROOT / package).rglob("*.py"))
    for path in shipped:
        body = path.read_text(errors="replace")
        for name, value in secret_values.items():
            assert value not in body, f"{path} holds the value of {name}"


# -- 11. load: 200 samples x 50 cells at once to 2 workers -------------------------------------------------------

N_SAMPLES = 200
CELLS_EACH = 50


@pytest.mark.timeout(240)
def test_load_200_samples_of_50_cells_to_two_workers_all_done_row_counts_exact(stack: Stack, tmp_path: Path) -> None:
    from trainer.synth import write_sample

    # 50 distinct small cells, written as 200 slides of 50 files each (10,000 image files).
    originals = [p.read_bytes() for p in write_sample(tmp_path / "cells", CELLS_EACH, 0.3, seed=11, size=32)]
    samples: dict[str, list[str]] = {}
    for i in range(N_SAMPLES):
        folder = tmp_path / "load" / f"L{i:03d}"
        folder.mkdir(parents=True)
        for j, data in enumerate(originals):
            (folder / f"cell_{j:02d}.bmp").write_bytes(data)
        samples[f"L{i:03d}"] = [str(folder)]
    workers = [stack.start_worker(concurrency=1, ALLSCORE_BATCH_SIZE="64") for _ in range(2)]
    started = time.monotonic()
    job = stack.submit(samples)
    rows = stack.wait_final(job, N_SAMPLES, 180)
    elapsed = time.monotonic() - started

    assert len(rows) == N_SAMPLES and {r["status"] for r in rows.values()} == {"done"}
    assert sum(r["n_cells"] for r in rows.values()) == N_SAMPLES * CELLS_EACH
    assert sum(r["n_failed"] for r in rows.values()) == 0
    per_sample = stack.query(
        "SELECT r.sample_id, r.n_cells, r.n_all, count(c.image_uri) AS cells, "
        "count(*) FILTER (WHERE c.is_all) AS called_all FROM sample_results r "
        "LEFT JOIN cell_results c ON c.sample_id = r.sample_id AND c.model_version = r.model_version "
        "WHERE r.job_id = :job GROUP BY r.sample_id, r.n_cells, r.n_all",
        job=job,
    )
    assert len(per_sample) == N_SAMPLES
    assert all(r["cells"] == CELLS_EACH == r["n_cells"] and r["called_all"] == r["n_all"] for r in per_sample)
    assert stack.query("SELECT count(*) AS n FROM cell_results")[0]["n"] == N_SAMPLES * CELLS_EACH
    assert stack.duplicate_cells() == 0
    # Every sample ran exactly once, and both workers took a share.
    assert stack.query("SELECT max(attempts) AS m FROM samples")[0]["m"] == 1
    done_by = [w.log().count("cells (0 failed)") for w in workers]
    assert sum(done_by) == N_SAMPLES and min(done_by) > 0, done_by
    assert stack.broker_keys() == {"queued": 0, "unacked": 0}
    print(f"load: {N_SAMPLES} samples x {CELLS_EACH} cells in {elapsed:.1f}s; per worker {done_by}")

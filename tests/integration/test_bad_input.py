"""Bad input is refused or marked, never run and never lost: a corrupt, swapped or unsafe model, unreadable images
inside a sample, submissions that break the rules, hostile or malformed messages put straight on the queue. Real
Redis, PostgreSQL, moto S3 over HTTP and real workers; what is checked is what an operator checks in the views.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.errors import AllscoreError
from core.manifest import ModelError
from core.settings import get_settings, reset_settings_cache
from core.storage import BucketNotFound, store_for
from tests.fixtures import PublishedModel
from tests.harness.faults import wait_until
from tests.integration.stack import Stack
from worker.client import SubmitError, submit_samples

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


# -- 6. a corrupted or swapped model.keras, and a model carrying a Lambda layer ------------------------------


def _publish_variants(store: str, model: PublishedModel, tmp: Path) -> dict[str, str]:
    """Publish the tiny model as `good`, `corrupt` and `swapped` (bytes changed after publishing), and a
    `lambda` version whose model.keras (sha256 right) holds a Lambda layer; return name -> reference."""
    import keras

    from core.artifact import Registry
    from core.manifest import sha256_file
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

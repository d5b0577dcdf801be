"""The scoring engine on SQLite with a stand-in model whose answers the test knows in advance."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from core.artifact import LoadedModel
from core.contract import ScoreMessage
from core.manifest import ModelManifest
from core.storage import LocalStore
from db import repository
from db.engine import make_engine, session_factory, transaction
from db.errors import StaleDelivery
from db.migrate import upgrade
from tests.harness.artifacts import stand_in_manifest
from tests.harness.oracles import wilson_by_inverting_the_score_test
from worker.engine import score_sample

SIZE = 16


class BrightnessModel:
    """p(all) = mean pixel value / 255: the test chooses each cell's probability by its brightness."""

    def __init__(self) -> None:
        self.batch_shapes: list[tuple[int, ...]] = []

    def __call__(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        assert training is False
        self.batch_shapes.append(tuple(x.shape))
        return (x.reshape(len(x), -1).mean(axis=1) / 255.0).reshape(-1, 1)


def _manifest(sens: float = 0.9, spec: float = 0.8) -> ModelManifest:
    return stand_in_manifest(SIZE, sens, spec)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'scores.db'}"
    upgrade(url)
    factory = session_factory(make_engine(url))
    with transaction(factory) as session:
        repository.create_job(session=session, job_id="job1", n_samples=1)
        repository.enqueue_sample(session=session, job_id="job1", sample_id="S1", model_version="fake:1")
    return factory


def _message(uris: tuple[str, ...]) -> ScoreMessage:
    return ScoreMessage(job_id="job1", sample_id="S1", image_uris=uris, model_version="fake:1", submission=1)


def _write_cells(folder: Path, values: list[int]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for i, v in enumerate(values):
        path = folder / f"cell_{i:03d}.png"
        path.write_bytes(_png(v))
        uris.append(str(path))
    return uris


def test_engine_writes_counts_fraction_interval_and_correction(tmp_path: Path, sessions) -> None:
    # 70 cells (two batches of 64, the second padded): 21 bright (p > 0.5) and 49 dark, plus 2 bad files.
    values = [230] * 21 + [30] * 49
    uris = _write_cells(tmp_path / "cells", values)
    (tmp_path / "cells" / "empty.png").write_bytes(b"")
    (tmp_path / "cells" / "text.png").write_bytes(b"%PDF-1.4 not an image")
    uris += [
        str(tmp_path / "cells" / "empty.png"),
        str(tmp_path / "cells" / "text.png"),
        str(tmp_path / "cells" / "missing.png"),
    ]
    model = BrightnessModel()
    store = LocalStore()
    with ThreadPoolExecutor(4) as pool:
        summary = score_sample(
            _message(tuple(uris)),
            loaded=LoadedModel(model=model, manifest=_manifest(), path=tmp_path),
            fetch=store.read_bytes,
            sessions=sessions,
            pool=pool,
            batch_size=64,
        )
    assert model.batch_shapes == [(64, SIZE, SIZE, 3), (64, SIZE, SIZE, 3)]  # fixed size, last one padded
    assert (summary.n_cells, summary.n_all, summary.n_failed) == (73, 21, 3)
    with sessions() as session:
        row = repository.get_sample_results(session=session, sample_ids=["S1"])[0]
        cells = repository.get_cell_results(session=session, sample_id="S1")
    assert row["status"] == "done"
    assert (row["n_cells"], row["n_all"], row["n_failed"]) == (73, 21, 3)
    assert row["all_fraction"] == pytest.approx(21 / 70)
    low, high = wilson_by_inverting_the_score_test(21, 70)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # Rogan-Gladen with sensitivity 0.9 and specificity 0.8: (0.3 + 0.8 - 1) / (0.9 + 0.8 - 1).
    assert row["corrected_fraction"] == pytest.approx((0.3 + 0.8 - 1) / 0.7)
    assert row["flags"] == "all_ge_5pct,all_ge_20pct,all_ge_25pct"
    assert row["mean_p_all"] == pytest.approx((21 * 230 + 49 * 30) / 255 / 70, abs=1e-3)
    assert len(cells) == 73
    errors = {Path(c["image_uri"]).name: c["error"] for c in cells if c["error"]}
    assert set(errors) == {"empty.png", "text.png", "missing.png"}
    assert all(c["p_all"] is None and c["is_all"] is None for c in cells if c["error"])


def test_a_duplicate_delivery_after_done_writes_nothing(tmp_path: Path, sessions) -> None:
    uris = _write_cells(tmp_path / "cells", [200, 20, 20])
    loaded = LoadedModel(model=BrightnessModel(), manifest=_manifest(), path=tmp_path)
    with ThreadPoolExecutor(2) as pool:

        def run() -> None:
            score_sample(
                _message(tuple(uris)),
                loaded=loaded,
                fetch=LocalStore().read_bytes,
                sessions=sessions,
                pool=pool,
                batch_size=8,
            )

        run()
        # A duplicate delivery of the same submission, after it ended, writes nothing.
        with pytest.raises(StaleDelivery, match="already done"):
            run()
    with sessions() as session:
        n_rows = session.execute(text("SELECT count(*) FROM cell_results WHERE sample_id = 'S1'")).scalar_one()
        n_samples = session.execute(text("SELECT count(*) FROM sample_results WHERE sample_id = 'S1'")).scalar_one()
    assert (n_rows, n_samples) == (3, 1)


def test_sample_with_no_readable_cell_is_done_with_no_fraction(tmp_path: Path, sessions) -> None:
    bad = tmp_path / "bad.bmp"
    bad.write_bytes(b"BM\x00\x01")
    loaded = LoadedModel(model=BrightnessModel(), manifest=_manifest(), path=tmp_path)
    with ThreadPoolExecutor(1) as pool:
        summary = score_sample(
            _message((str(bad),)),
            loaded=loaded,
            fetch=LocalStore().read_bytes,
            sessions=sessions,
            pool=pool,
        )
    assert (summary.n_cells, summary.n_failed, summary.all_fraction, summary.ci_low) == (1, 1, None, None)

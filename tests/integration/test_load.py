"""A burst of load: 200 samples of 50 cells at once to two real workers; every sample done once, row counts exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


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

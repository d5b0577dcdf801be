"""A real worker serving a version trained with per-sample stain normalisation, over Redis, PostgreSQL and S3:
each sample's cells are scored normalised with that sample's own colour statistics, whatever else it scores."""

from __future__ import annotations

import numpy as np
import pytest

from core.artifact import Registry, load_keras
from core.calibration import apply_temperature
from core.imaging import decode_image
from core.settings import reset_settings_cache
from core.stainnorm import fit, normalise
from core.storage import store_for
from tests.fixtures import PublishedModel
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration


def test_a_worker_normalises_each_sample_with_its_own_statistics(
    stack: Stack, stain_model: PublishedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLSCORE_MODEL_STORE", stain_model.store)
    reset_settings_cache()
    # Two slides, each stained with its own tint (trainer.synth.write_sample), scored in one job by one process.
    slides = {"pale": stack.upload_sample("pale", 24, fraction=0.25, seed=11), "dark": None}
    slides["dark"] = stack.upload_sample("dark", 30, fraction=0.5, seed=12)
    worker = stack.start_worker(concurrency=1, ALLSCORE_MODEL_STORE=stain_model.store)
    job = stack.submit({name: [prefix] for name, prefix in slides.items()}, model_ref=stain_model.ref)
    rows = stack.wait_final(job, 2, 120)
    assert {k: (r["status"], r["n_cells"]) for k, r in rows.items()} == {"pale": ("done", 24), "dark": ("done", 30)}
    (line,) = [ln for ln in worker.log().splitlines() if f"model loaded: {stain_model.ref}" in ln]
    assert "stain normalisation per sample (reinhard-lab)" in line, line

    manifest = stain_model.manifest
    assert manifest.stain_norm is not None
    target = manifest.stain_norm.target()
    model = load_keras(Registry(stain_model.store).fetch(stain_model.ref)[0])
    bucket = store_for(stack.bucket)
    for name in slides:
        cells = stack.query("SELECT image_uri, p_all FROM cell_results WHERE sample_id = :s ORDER BY image_uri", s=name)
        x = np.stack([decode_image(bucket.read_bytes(c["image_uri"]), manifest.input_size) for c in cells])
        written = np.array([c["p_all"] for c in cells])
        # What the model says of this slide's cells normalised with this slide's statistics (all its cells: fewer
        # than the 256 a sample is fitted on) ...
        expected = apply_temperature(
            np.asarray(model(normalise(x, fit(x), target), training=False)).reshape(-1), manifest.temperature
        )
        np.testing.assert_allclose(written, expected, atol=1e-5)
        # ... which is not what it says of the pixels as read.
        as_read = apply_temperature(np.asarray(model(x, training=False)).reshape(-1), manifest.temperature)
        assert np.abs(written - as_read).max() > 20 * max(1e-6, np.abs(written - expected).max())

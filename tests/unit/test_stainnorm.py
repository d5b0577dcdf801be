"""Per-sample stain normalisation (core/stainnorm.py, Reinhard in lαβ): it takes a slide's tint out, keeps the
black outside a crop black, fits each sample on its own cells only, and the engine scores every cell of a sample,
the ones it held back to fit on included, on normalised pixels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.stainnorm import FOREGROUND_MIN, StainError, StainStats, fit, normalise, normalise_groups
from trainer.synth import render_cell, subject_tint


def cells(n: int, tint: np.ndarray | None, seed: int = 0, size: int = 48) -> np.ndarray:
    """n synthetic crops (half ALL), the same cells for one seed whatever the tint."""
    return np.stack([render_cell(np.random.default_rng(seed + i), i % 2 == 0, tint, size) for i in range(n)])


def cell_pixels(images: np.ndarray) -> np.ndarray:
    return images.max(axis=-1) > FOREGROUND_MIN


def test_a_slides_tint_is_taken_out() -> None:
    plain = cells(24, None)
    tint = subject_tint(np.random.default_rng(5), 0.10)  # a strong stain: red gain 0.78, green 0.88, blue 0.94
    tinted = cells(24, tint)
    mask = cell_pixels(plain)
    before = np.abs(tinted.astype(int) - plain)[mask].mean()
    restored = normalise(tinted, fit(tinted), fit(plain))
    after = np.abs(restored.astype(int) - plain)[mask].mean()
    assert before > 5  # grey levels: the tint is visible
    assert after < before / 5 and after < 1.5
    # What is outside the cell (black, the darkest rim) is left as it was, and every cell pixel stays one.
    outside = ~cell_pixels(tinted)
    assert np.array_equal(restored[outside], tinted[outside]) and (restored[outside] <= FOREGROUND_MIN).all()
    assert np.array_equal(cell_pixels(restored), cell_pixels(tinted))
    assert restored.dtype == np.uint8 and restored.shape == tinted.shape


def test_each_group_is_fitted_on_its_own_cells_only() -> None:
    a = cells(10, subject_tint(np.random.default_rng(1), 0.10), seed=0)
    b = cells(10, subject_tint(np.random.default_rng(2), 0.10), seed=100)
    target = fit(cells(10, None, seed=200))
    together = normalise_groups(np.concatenate([a, b]), ["A"] * 10 + ["B"] * 10, target)
    assert np.array_equal(together[:10], normalise(a, fit(a), target))
    # Another sample's pixels change nothing in this one's.
    other = normalise_groups(np.concatenate([a, 255 - b]), ["A"] * 10 + ["B"] * 10, target)
    assert np.array_equal(other[:10], together[:10])
    # Two tints normalised onto one target end up closer than they started.
    mean = lambda x: x[cell_pixels(x)].mean(axis=0)  # noqa: E731
    assert np.abs(mean(together[:10]) - mean(together[10:])).max() < np.abs(mean(a) - mean(b)).max() / 3


def test_the_opencv_path_and_the_plain_numpy_fallback_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    sample, target = cells(16, subject_tint(np.random.default_rng(4), 0.10), seed=40, size=64), cells(16, None)
    fast = normalise(sample, fit(sample), fit(target))
    monkeypatch.setenv("ALLSCORE_STAIN_NORM_IMPL", "numpy")
    plain = normalise(sample, fit(sample), fit(target))
    assert np.abs(fast.astype(int) - plain).max() <= 1


def test_statistics_that_cannot_be_fitted_are_refused() -> None:
    with pytest.raises(StainError, match="too few to fit the sample's stain statistics"):
        fit(np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(StainError, match="positive deviations"):
        StainStats.of([0, 0, 0], [1, 0, 1])
    with pytest.raises(StainError, match="three means"):
        StainStats.of([0, 0], [1, 1])


def test_the_manifest_records_the_target_and_refuses_an_unknown_method() -> None:
    from pydantic import ValidationError

    from core.manifest import StainNormRecord

    target = fit(cells(6, None))
    record = StainNormRecord.from_target(target, "6 cells")
    again = StainNormRecord.model_validate_json(record.model_dump_json())
    assert again.target().mean == pytest.approx(target.mean, abs=1e-5)
    assert again.target().std == pytest.approx(target.std, abs=1e-5)
    with pytest.raises(ValidationError, match="knows only 'reinhard-lab'"):
        StainNormRecord.model_validate({**record.model_dump(), "method": "macenko"})


def mean_red(x: np.ndarray, training: bool = False) -> np.ndarray:
    """A 'model' that reads the mean red level of the cell pixels: any change of colour changes its answer."""
    x = np.asarray(x, np.float32)
    mask = x.max(axis=-1) > FOREGROUND_MIN
    red = (x[..., 0] * mask).sum(axis=(1, 2)) / np.maximum(mask.sum(axis=(1, 2)), 1)
    return (red / 255.0).reshape(-1, 1)


@pytest.mark.parametrize("fit_cells", [3, 64])  # fitted on the first 3 of 7 cells; on all 7 (fewer than asked)
def test_the_engine_scores_a_sample_on_pixels_normalised_with_its_own_statistics(fit_cells: int) -> None:
    from worker.engine import score_units
    from worker.fields import Item, Unit

    sample = cells(7, subject_tint(np.random.default_rng(3), 0.10), seed=10)
    target = fit(cells(8, None, seed=300))
    uris = [f"mem://cell{i}.png" for i in range(len(sample))] + ["mem://broken.png"]

    def read(uri: str) -> Unit:
        if uri.endswith("broken.png"):
            return Unit(uri, [Item(uri, error="not an image")], error="not an image")
        return Unit(uri, [Item(uri, image=sample[uris.index(uri)].copy())])

    with ThreadPoolExecutor(2) as pool:
        results, _ = score_units(
            uris, read, model=mean_red, size=48, threshold=0.5, pool=pool, batch_size=4, stain=target,
            fit_cells=fit_cells,
        )  # fmt: skip
        plain, _ = score_units(uris, read, model=mean_red, size=48, threshold=0.5, pool=pool, batch_size=4)
    expected = mean_red(normalise(sample, fit(sample[:fit_cells]), target))[:, 0]
    assert [r.image_uri for r in results] == uris  # in the order submitted, the failed image in its place
    assert [r.p_all for r in results[:-1]] == pytest.approx(expected.tolist(), abs=1e-6)
    assert results[-1].p_all is None and results[-1].error == "not an image"
    # Without the version's target the pixels are scored as read.
    assert [r.p_all for r in plain[:-1]] == pytest.approx(mean_red(sample)[:, 0].tolist(), abs=1e-6)
    assert max(abs(a.p_all - b.p_all) for a, b in zip(results[:-1], plain[:-1], strict=True)) > 0.02

"""Test-time augmentation (core/tta.py): the 8 views are the dihedral group of the square, and the engine averages
the model's answers over them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.tta import averaged, dihedral_views


def test_the_eight_views_are_the_rotations_and_mirror_images_of_the_square() -> None:
    # A 3x3 image with nine different pixels: each view is a different arrangement, and the set of views is closed
    # under rotation and mirroring (the dihedral group), so no view is missed or repeated.
    image = np.arange(9, dtype=np.uint8).reshape(1, 3, 3, 1)
    views = [v[0, :, :, 0] for v in dihedral_views(image)]
    keys = {v.tobytes() for v in views}
    assert len(views) == 8 and len(keys) == 8
    for v in views:
        assert np.rot90(v).tobytes() in keys and v[:, ::-1].tobytes() in keys
    assert np.array_equal(views[0], image[0, :, :, 0])  # the first view is the image itself
    assert [v.flags.c_contiguous for v in dihedral_views(image)] == [True] * 8


def test_averaged_predictions_and_what_is_refused() -> None:
    batch = np.random.default_rng(0).integers(0, 255, (4, 6, 6, 3), dtype=np.uint8)

    def left_half(x: np.ndarray) -> np.ndarray:  # orientation-sensitive: the mean of the left half of each image
        return x[:, :, :3].reshape(len(x), -1).mean(axis=1)

    once = averaged(left_half, batch)
    assert np.allclose(once, left_half(batch))
    # over the 8 views every pixel lies in the left half of exactly 4 of them: the mean is the whole image's
    assert np.allclose(averaged(left_half, batch, 8), batch.reshape(4, -1).mean(axis=1))
    with pytest.raises(ValueError, match="1 or 8 views"):
        averaged(left_half, batch, 4)
    with pytest.raises(ValueError, match="square"):
        list(dihedral_views(np.zeros((1, 4, 6, 3), np.uint8)))


def test_the_engine_scores_each_cell_over_its_eight_views(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from core.storage import LocalStore
    from worker.engine import score_cells

    def left_half(x: np.ndarray, training: bool = False) -> np.ndarray:
        return (x[:, :, : x.shape[2] // 2].reshape(len(x), -1).mean(axis=1) / 255.0).reshape(-1, 1)

    path = tmp_path / "cell.png"
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, :4] = 200  # bright on the left only: 200/255 seen as is, 100/255 over the eight views
    Image.fromarray(half).save(path)
    with ThreadPoolExecutor(1) as pool:
        fetch = LocalStore().read_bytes
        (plain,) = score_cells([str(path)], model=left_half, size=8, threshold=0.5, fetch=fetch, pool=pool)
        (eight,) = score_cells([str(path)], model=left_half, size=8, threshold=0.5, fetch=fetch, pool=pool, tta=8)
    assert plain.p_all == pytest.approx(200 / 255, abs=1e-6) and plain.is_all
    assert eight.p_all == pytest.approx(100 / 255, abs=1e-6) and not eight.is_all


def test_allscore_tta_takes_1_or_8() -> None:
    from pydantic import ValidationError

    from core.settings import Settings

    assert Settings().tta == 1
    assert Settings(tta=8).tta == 8
    with pytest.raises(ValidationError, match="tta"):
        Settings(tta=4)


def test_allscore_tta_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings

    monkeypatch.setenv("ALLSCORE_TTA", "8")
    assert Settings().tta == 8

"""core.morph: OpenCV and the scipy fallback give the same pixels (segmentation's results must not depend on which
is installed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from core import morph


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = [np.ones((9, 12), bool), np.zeros((9, 12), bool), np.eye(6, dtype=bool), np.ones((1, 7), bool)]
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(3, 90, 2))
        out.append(ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 3)) > rng.uniform(0.4, 0.6))
    return out


def _run(backend: str, monkeypatch: pytest.MonkeyPatch) -> list[list[np.ndarray]]:
    monkeypatch.setattr(morph, "_backend", morph.backend())  # restored after the test
    morph.use(backend)
    assert morph.backend() == backend
    rng = np.random.default_rng(3)
    results = []
    for mask in _masks():
        fp = morph.disk(float(rng.uniform(0, 4.5)))
        values = rng.random(mask.shape).astype(np.float32)
        field = rng.integers(1, 256, (mask.shape[0] + 4, mask.shape[1] + 6, 3), dtype=np.uint8)
        results.append(
            [
                morph.opening(mask, fp),
                morph.dilation(mask, fp),
                morph.erosion(mask, fp),
                morph.dilation(mask),
                morph.erosion(mask),
                morph.distance(mask),
                morph.mean3(values),
                *morph.label(mask)[:1],
                np.sort(morph.component_areas(mask)),
                morph.fill_holes(mask),
                morph.black_outside(field[2:-2, 3:-3], mask),  # a view into a larger image, as a cell's bbox is
                np.array([morph.corner_hull_area(mask)]),
            ]
        )
    return results


def test_opencv_and_scipy_give_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cv2")
    fast, plain = _run("opencv", monkeypatch), _run("scipy", monkeypatch)
    for case, (a_row, b_row) in enumerate(zip(fast, plain, strict=True)):
        for op, (a, b) in enumerate(zip(a_row, b_row, strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype, (case, op)
            if a.dtype == bool:
                assert np.array_equal(a, b), (case, op)
            else:
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"case {case}, op {op}")


def test_what_the_operations_do() -> None:
    # one 5x5 square and a stray pixel: an opening by the radius-1 disk (a cross) rounds the square's corners and
    # removes the stray pixel; erosion by the cross leaves the square's 3x3 core; the distance map peaks at the
    # square's centre (3 steps from the background in both metrics)
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    mask[0, 8] = True
    opened = morph.opening(mask, morph.disk(1))
    corners = np.zeros_like(mask)
    corners[[2, 2, 6, 6], [2, 6, 2, 6]] = True
    assert np.array_equal(opened, mask & ~corners & (np.arange(9)[None, :] < 8))
    assert morph.erosion(mask).sum() == 9
    assert morph.distance(mask)[4, 4] == 3.0 and morph.distance(mask)[0, 0] == 0.0
    assert morph.disk(1.5).sum() == 9 and morph.disk(0).sum() == 1
    image = np.full((9, 9, 3), 200, np.uint8)
    cut = morph.black_outside(image, mask)
    assert cut.shape == image.shape and cut.dtype == np.uint8 and (image == 200).all()  # a new image
    assert (cut[mask] == 200).all() and (cut[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["opencv", "scipy"])
def test_hulls_are_each_labels_hull_together(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # labels of several parts each (a nucleus's lobes), and two labels touching corner to corner
    monkeypatch.setattr(morph, "_backend", morph.backend())
    morph.use(backend)
    rng = np.random.default_rng(11)
    cases = []
    for mask in _masks():
        parts, n = morph.label(mask)
        lut = np.concatenate([[0], rng.integers(1, max(2, n // 2 + 1), n)]).astype(np.int32)
        cases.append(lut[parts])
    corner = np.zeros((12, 12), np.int32)
    corner[2:6, 2:6], corner[6:10, 6:10], corner[1, 9] = 1, 2, 1
    cases.append(corner)
    for labels in cases:
        expected = labels > 0
        for lab_id in range(1, int(labels.max()) + 1):
            if (labels == lab_id).any():
                expected = expected | morph.hull(labels == lab_id)
        assert np.array_equal(morph.hulls(labels), expected)
    assert morph.hulls(corner)[2, 7] and not morph.hulls(corner)[2, 9]  # label 1's own hull, not one of both labels


def test_soften_is_scipys_gaussian_filter_rounded() -> None:
    for mask in _masks():
        for sigma in (0.7, 1.3):
            expected = np.round(ndi.gaussian_filter(mask.astype(np.float32), sigma, mode="constant") * 255)
            assert np.array_equal(morph.soften(mask, sigma), expected.astype(np.uint8))


def test_allscore_morph_scipy_forces_the_fallback_in_a_new_process() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "ALLSCORE_MORPH": "scipy"}
    code = "from core import morph; print(morph.backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scipy"
    with pytest.raises(ValueError, match="use 'opencv'"):
        morph.use("numpy")

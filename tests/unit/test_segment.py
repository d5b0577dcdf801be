"""core.segment on real fields (copies in tests/data, so these run without ../shared)."""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cellkind import LYMPHOID, OTHER
from core.cut import CROP_SIZE, cut_cell, cut_for_model
from core.errors import AllscoreError
from core.segment import (
    CNMC_UM_PER_PX,
    FieldSegmentation,
    FoundCell,
    SegmentationError,
    estimate_um_per_px,
    segment_field,
)

DATA = Path(__file__).resolve().parents[1] / "data"
BCCD = DATA / "bccd"
CNMC = sorted((DATA / "cnmc").glob("*/*.bmp"))

Box = tuple[float, float, float, float]


@cache
def bccd_boxes() -> dict[str, list[Box]]:
    out: dict[str, list[Box]] = {}
    with open(BCCD / "wbc.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            out.setdefault(r["file"], []).append(
                (float(r["xmin"]), float(r["ymin"]), float(r["xmax"]), float(r["ymax"]))
            )
    return out


@cache
def field(name: str, factor: float = 1.0) -> np.ndarray:
    with Image.open(BCCD / "JPEGImages" / name) as im:
        im = im.convert("RGB")
        if factor != 1.0:
            im = im.resize((round(im.width * factor), round(im.height * factor)))
        return np.asarray(im)


def inside(cell: FoundCell, box: Box, factor: float = 1.0) -> bool:
    x, y = cell.centroid
    return box[0] * factor <= x <= box[2] * factor and box[1] * factor <= y <= box[3] * factor


def test_the_copies_are_there() -> None:
    assert len(bccd_boxes()) >= 10
    assert all((BCCD / "JPEGImages" / n).is_file() for n in bccd_boxes())
    assert (BCCD / "LICENSE").is_file() and (DATA / "cnmc" / "README.md").is_file()
    assert len(CNMC) == 24


@pytest.mark.parametrize("factor", [1.0, 0.6, 1.6])
def test_bccd_white_cells_are_found_at_three_magnifications(factor: float) -> None:
    boxes = bccd_boxes()
    hit = extra = total = 0
    for name, bx in boxes.items():
        seg = segment_field(field(name, factor))
        assert seg.scale_source == "estimated"
        total += len(bx)
        hit += sum(any(inside(c, b, factor) for c in seg.cells) for b in bx)
        extra += sum(not any(inside(c, b, factor) for b in bx) for c in seg.cells)
    assert hit / total >= 0.9, f"recall {hit}/{total} at x{factor}"
    assert extra <= 0.1 * len(boxes), f"{extra} cells outside every white-cell box at x{factor}"


def test_same_cells_and_scale_at_another_magnification() -> None:
    for name in list(bccd_boxes())[:6]:
        base = segment_field(field(name))
        for factor in (0.6, 1.6):
            seg = segment_field(field(name, factor))
            # the estimated scale follows the magnification
            assert seg.um_per_px * factor == pytest.approx(base.um_per_px, rel=0.15)
            assert len(seg.cells) == len(base.cells), (name, factor)
            for a, b in zip(base.cells, seg.cells, strict=True):
                dist_um = np.hypot(a.centroid[0] - b.centroid[0] / factor, a.centroid[1] - b.centroid[1] / factor)
                assert dist_um * base.um_per_px < 1.5, (name, factor)
                assert b.area_um2 == pytest.approx(a.area_um2, rel=0.3)
                assert b.kind == a.kind and b.edge == a.edge


def test_touching_white_cells_are_two_cells_and_the_cut_one_is_an_edge_cell() -> None:
    seg = segment_field(field("BloodImage_00313.jpg"))
    boxes = bccd_boxes()["BloodImage_00313.jpg"]
    assert len(seg.cells) == 2
    # the boxes overlap: each cell is nearest to the centre of a different box
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
    nearest = {
        min(range(2), key=lambda i: np.hypot(c.centroid[0] - centres[i][0], c.centroid[1] - centres[i][1]))
        for c in seg.cells
    }
    assert nearest == {0, 1} and all(any(inside(c, b) for c in seg.cells) for b in boxes)
    low = max(seg.cells, key=lambda c: c.centroid[1])
    assert low.edge and low.bbox[3] == seg.height
    top = segment_field(field("BloodImage_00002.jpg")).cells
    assert [c.edge for c in top] == [True] and top[0].bbox[1] == 0


def test_found_cells_are_consistent() -> None:
    seg = segment_field(field("BloodImage_00313.jpg"))
    assert (seg.height, seg.width) == (480, 640)
    keys = [(c.centroid[1], c.centroid[0]) for c in seg.cells]
    assert keys == sorted(keys) and [c.index for c in seg.cells] == list(range(len(seg.cells)))
    for c in seg.cells:
        x0, y0, x1, y1 = c.bbox
        assert c.mask.dtype == bool and c.mask.shape == (y1 - y0, x1 - x0)
        assert c.mask[0].any() and c.mask[-1].any() and c.mask[:, 0].any() and c.mask[:, -1].any()  # tight box
        ys, xs = np.nonzero(c.mask)
        assert c.centroid == pytest.approx((xs.mean() + x0, ys.mean() + y0))
        assert c.area_um2 == pytest.approx(c.mask.sum() * seg.um_per_px**2)
        assert c.kind in (LYMPHOID, OTHER)
        # a white cell is 8-20 um across
        assert 8 <= 2 * np.sqrt(c.area_um2 / np.pi) <= 22


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("BloodImage_00000.jpg", OTHER),  # a segmented neutrophil (4-5 lobes)
        ("BloodImage_00004.jpg", OTHER),  # a segmented neutrophil
        ("BloodImage_00351.jpg", OTHER),  # a segmented neutrophil with ample cytoplasm
        ("BloodImage_00020.jpg", LYMPHOID),  # a small lymphocyte: one round nucleus, a rim of cytoplasm
    ],
)
def test_kind_of_bccd_cells(name: str, kind: str) -> None:
    cells = [c for c in segment_field(field(name)).cells if not c.edge]
    assert [c.kind for c in cells] == [kind]


@pytest.mark.parametrize("seed", [0, 1])
def test_touching_lymphoid_cells_with_close_nuclei_are_two_cells(seed: int) -> None:
    # two synthetic blasts whose outlines meet and whose nuclei come within ~1.5 um: one marker before the pair split
    from trainer.synth_fields import make_field

    rgb, placed = make_field(np.random.default_rng(seed), None, 0.1, width=320, height=240, cells=2, touching=1.0)
    assert len(placed) == 2 and not any(c.edge for c in placed)
    seg = segment_field(rgb, um_per_px=0.1)
    assert len(seg.cells) == 2
    for true in placed:
        err_um = min(np.hypot(c.centroid[0] - true.centre[0], c.centroid[1] - true.centre[1]) for c in seg.cells) * 0.1
        assert err_um < 3.0


@pytest.mark.parametrize("name", ["BloodImage_00000.jpg", "BloodImage_00004.jpg", "BloodImage_00006.jpg"])
def test_lobed_neutrophil_stays_one_cell(name: str) -> None:
    # 2-5 lobes, some of them separate bodies in the nucleus mask: one cell, inside its box
    seg = segment_field(field(name))
    assert len(seg.cells) == len(bccd_boxes()[name])
    assert all(any(inside(c, b) for c in seg.cells) for b in bccd_boxes()[name])


@pytest.mark.parametrize("path", CNMC, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cnmc_cell_is_one_lymphoid_cell(path: Path) -> None:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    seg = segment_field(rgb, um_per_px=CNMC_UM_PER_PX)
    assert seg.scale_source == "given"
    assert [c.kind for c in seg.cells] == [LYMPHOID]
    cell = seg.cells[0]
    # the whole non-black cell, not just its nucleus
    specimen = rgb.max(axis=2) > 40
    full = np.zeros(specimen.shape, bool)
    x0, y0, x1, y1 = cell.bbox
    full[y0:y1, x0:x1] = cell.mask
    assert (full & specimen).sum() / specimen.sum() > 0.95
    assert not cell.edge


def test_cnmc_cell_without_a_scale_falls_back_to_the_default() -> None:
    with Image.open(CNMC[0]) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert estimate_um_per_px(rgb) is None
    seg = segment_field(rgb)
    assert (seg.scale_source, seg.um_per_px) == ("default", CNMC_UM_PER_PX)
    assert len(seg.cells) == 1


def test_cut_cell_is_centred_black_outside_and_at_the_target_scale() -> None:
    name = "BloodImage_00200.jpg"
    rgb = field(name)
    seg = segment_field(rgb)
    cell = next(c for c in seg.cells if not c.edge)
    out = cut_cell(rgb, cell, field_um_per_px=seg.um_per_px, target_um_per_px=CNMC_UM_PER_PX)
    assert out.shape == (CROP_SIZE, CROP_SIZE, 3) and out.dtype == np.uint8
    on = out.max(axis=2) > 0
    ys, xs = np.nonzero(on)
    assert abs(xs.mean() - (CROP_SIZE - 1) / 2) < 2 and abs(ys.mean() - (CROP_SIZE - 1) / 2) < 2
    # the cell's area in the crop is its area in um at the target scale
    assert on.sum() * CNMC_UM_PER_PX**2 == pytest.approx(cell.area_um2, rel=0.05)
    # black outside the mask: every lit pixel maps back inside the cell's mask
    f = seg.um_per_px / CNMC_UM_PER_PX
    x0, y0, _, _ = cell.bbox
    sy = np.clip(((ys - ys.mean()) / f + cell.centroid[1] - y0).round().astype(int), 0, cell.mask.shape[0] - 1)
    sx = np.clip(((xs - xs.mean()) / f + cell.centroid[0] - x0).round().astype(int), 0, cell.mask.shape[1] - 1)
    near = np.zeros_like(cell.mask)
    near[sy, sx] = True
    assert (near & ~cell.mask).sum() < 0.03 * near.sum()
    # the border of the crop is black (the cell fits: it is under 20 um and the frame is 20.7 um)
    assert not on[0].any() and not on[-1].any() and not on[:, 0].any() and not on[:, -1].any()


def test_cut_cell_keeps_the_scale_and_clips_a_cell_larger_than_the_frame() -> None:
    rgb = field("BloodImage_00200.jpg")
    seg = segment_field(rgb)
    cell = next(c for c in seg.cells if not c.edge)
    small = cut_cell(rgb, cell, field_um_per_px=seg.um_per_px, target_um_per_px=0.02, size=200)
    assert small.shape == (200, 200, 3)
    assert (small.max(axis=2) > 0).all()  # 200 px at 0.02 um is 4 um: all inside the cell, clipped
    same = cut_cell(rgb, cell, field_um_per_px=seg.um_per_px, target_um_per_px=seg.um_per_px, size=600)
    assert (same.max(axis=2) > 0).sum() == pytest.approx(cell.mask.sum(), rel=0.02)


@pytest.mark.parametrize("size", [64, 96, 128, 200, 224, 450])
def test_the_model_sees_a_field_cell_exactly_as_it_would_see_its_crop(size: int) -> None:
    # The model was trained on 450x450 crops taken down to its input by decode_image: a cell cut from a field must
    # reach the model through the same resampling, pixel for pixel (cutting straight at the input's scale moved a
    # slide's ALL fraction by 0.03).
    from core.imaging import model_input

    for name in ("BloodImage_00200.jpg", "BloodImage_00048.jpg"):
        rgb = field(name)
        seg = segment_field(rgb, um_per_px=0.1)
        assert seg.cells
        for cell in seg.cells:
            crop = cut_cell(rgb, cell, field_um_per_px=0.1, target_um_per_px=CNMC_UM_PER_PX)
            fast = cut_for_model(rgb, cell, field_um_per_px=0.1, train_um_per_px=CNMC_UM_PER_PX, size=size)
            assert np.array_equal(fast, model_input(crop, size))


@pytest.mark.parametrize(
    "rgb",
    [
        np.zeros((480, 640, 3), np.uint8),
        np.full((480, 640, 3), 255, np.uint8),
        np.full((300, 400, 3), 128, np.uint8),
        np.zeros((1, 1, 3), np.uint8),
        np.full((1, 1, 3), 255, np.uint8),
        np.zeros((0, 5, 3), np.uint8),
    ],
    ids=["black", "white", "grey", "1x1 black", "1x1 white", "empty"],
)
@pytest.mark.parametrize("um", [None, 0.1])
def test_blank_fields_have_no_cells(rgb: np.ndarray, um: float | None) -> None:
    seg = segment_field(rgb, um_per_px=um)
    assert isinstance(seg, FieldSegmentation) and seg.cells == ()
    assert (seg.height, seg.width) == rgb.shape[:2]
    assert seg.scale_source == ("given" if um else "default")


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.uint16),
        [[[0, 0, 0]]],
    ],
    ids=["float", "grey", "rgba", "uint16", "list"],
)
def test_wrong_arrays_raise_the_typed_error(bad: object) -> None:
    for call in (segment_field, estimate_um_per_px):
        with pytest.raises(SegmentationError, match="uint8"):
            call(bad)  # type: ignore[operator]
    assert issubclass(SegmentationError, AllscoreError)


@pytest.mark.parametrize("um", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_scale_raises_the_typed_error(um: float) -> None:
    with pytest.raises(SegmentationError):
        segment_field(np.zeros((20, 20, 3), np.uint8), um_per_px=um)


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 1000, 4097])
def test_the_partial_sort_percentiles_are_numpys(n: int) -> None:
    from core.cellkind import _halfway
    from core.stain import percentile as _percentile
    from core.stain import percentiles as _percentiles

    v = np.random.default_rng(n).random(n).astype(np.float32)
    qs = (0.0, 10.0, 50.0, 90.0, 97.0, 100.0)
    np.testing.assert_allclose(_percentiles(v, qs), np.percentile(v, qs), rtol=0, atol=1e-6)
    assert _percentile(v, 97) == pytest.approx(float(np.percentile(v, 97)), abs=1e-6)
    assert _halfway(v) == pytest.approx(float(np.percentile(v, 10) + np.percentile(v, 90)) / 2, abs=1e-6)


def _disc_cell(um_per_px: float, cell_um: float, nucleus_um: float, side: int = 320) -> tuple[np.ndarray, float]:
    """A round white cell on a smear's pink: a purple nucleus in lilac cytoplasm, edges anti-aliased (4x4 samples per
    pixel), a little sensor noise; and its true area in um^2."""
    ss = 4
    yy, xx = (np.mgrid[0 : side * ss, 0 : side * ss] + 0.5) / ss
    r = np.hypot(xx - side / 2 - 0.3, yy - side / 2 + 0.2) * um_per_px
    cover = (r <= cell_um / 2).reshape(side, ss, side, ss).mean(axis=(1, 3))
    nucleus = (r <= nucleus_um / 2).reshape(side, ss, side, ss).mean(axis=(1, 3))
    background, cytoplasm, chromatin = (
        np.array([236.0, 214, 220]),
        np.array([196.0, 184, 222]),
        np.array([112.0, 62, 150]),
    )
    rgb = (
        background * (1 - cover[..., None]) + cytoplasm * (cover - nucleus)[..., None] + chromatin * nucleus[..., None]
    )
    rgb += np.random.default_rng(0).normal(0, 2, rgb.shape)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), float(cover.sum()) * um_per_px**2


@pytest.mark.parametrize("um_per_px", [0.08, 0.15])
@pytest.mark.parametrize(("cell_um", "nucleus_um"), [(12.0, 7.0), (11.0, 9.5)])
def test_outline_is_the_whole_cell_at_its_true_size(um_per_px: float, cell_um: float, nucleus_um: float) -> None:
    # The model reads a cell's size: the outline must take in the pale rim of wide cytoplasm and not overgrow a cell
    # with scant cytoplasm. Drawn on the working (shrunk) copy alone, it lost about 10 % of the area here.
    rgb, area_um2 = _disc_cell(um_per_px, cell_um, nucleus_um)
    (cell,) = segment_field(rgb, um_per_px=um_per_px).cells
    assert cell.area_um2 / area_um2 == pytest.approx(1.0, abs=0.04)

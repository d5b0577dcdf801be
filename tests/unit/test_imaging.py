"""decode_image: the preprocessing shared by training and serving, on real cells and on bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import AllscoreError
from core.imaging import DecodeError, decode_image, load_image
from core.settings import reset_settings_cache
from tests.helpers import BCCD_FIELDS, bmp_header_only, cnmc_cells, encode, png_header_only, solid_rgb

SIZE = 128


@pytest.fixture(scope="module")
def cells() -> list[Path]:
    return cnmc_cells()


def test_the_real_cells_decode_to_model_inputs(cells: list[Path]) -> None:
    assert len(cells) == 24
    for path in cells:
        x = decode_image(path.read_bytes(), SIZE, source=str(path))
        assert x.shape == (SIZE, SIZE, 3), path
        assert x.dtype == np.uint8, path
        assert x.max() > 50, f"{path} decoded to (nearly) black"
        # One segmented cell on a black background: the corners stay black.
        assert max(x[0, 0].max(), x[0, -1].max(), x[-1, 0].max(), x[-1, -1].max()) < 10, path


def test_a_nominal_size_image_is_passed_through_unchanged(cells: list[Path]) -> None:
    path = cells[0]
    with Image.open(path) as im:
        assert im.size == (450, 450)
        pixels = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(decode_image(path.read_bytes(), 450), pixels)


def test_decoding_is_deterministic_and_matches_load_image(cells: list[Path]) -> None:
    data = cells[-1].read_bytes()
    first = decode_image(data, SIZE)
    np.testing.assert_array_equal(first, decode_image(data, SIZE))
    np.testing.assert_array_equal(first, load_image(cells[-1], SIZE))


def test_downscaling_averages_rather_than_samples() -> None:
    # A one-pixel checkerboard: nearest-neighbour sampling would keep pure black/white, averaging gives grey.
    board = (np.indices((450, 450)).sum(axis=0) % 2 * 255).astype(np.uint8)
    x = decode_image(encode(board), SIZE)
    assert 100 < x.mean() < 155
    assert x.std() < 40


def test_a_larger_image_is_center_cropped_to_the_nominal_field() -> None:
    # 600x600 (the C-NMC final test set) with a 450x450 centre of one colour and a border of another.
    image = solid_rgb(600, 600, (255, 0, 0))
    image[75:525, 75:525] = (0, 200, 0)
    image[300, 300] = (255, 255, 255)  # a detail, so that the comparison below is not between flat images
    assert (decode_image(encode(image), 450)[:, :] == image[75:525, 75:525]).all()
    small = decode_image(encode(image), SIZE)
    # The cell keeps its scale: the same as decoding the 450x450 centre on its own, with no border leaking in.
    np.testing.assert_array_equal(small, decode_image(encode(image[75:525, 75:525]), SIZE))
    assert not (small == (255, 0, 0)).all(axis=-1).any()


def test_a_non_square_image_keeps_its_centre_square() -> None:
    image = solid_rgb(700, 450, (0, 0, 255))
    image[:, 125:575] = (255, 255, 0)
    assert (decode_image(encode(image), 450) == (255, 255, 0)).all()
    assert (decode_image(encode(image), SIZE) == (255, 255, 0)).all()


def test_a_smaller_non_square_image_is_cropped_to_its_largest_square_and_resized() -> None:
    image = solid_rgb(300, 200, (0, 0, 255))
    image[:, 50:250] = (255, 255, 0)
    x = decode_image(encode(image), 400)
    assert (x == (255, 255, 0)).all()


def test_a_small_image_is_resized_up() -> None:
    x = decode_image(encode(solid_rgb(8, 8, (10, 20, 30))), SIZE)
    assert x.shape == (SIZE, SIZE, 3)
    assert (x == (10, 20, 30)).all()


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = (np.arange(450 * 450) % 256).astype(np.uint8).reshape(450, 450)
    x = decode_image(encode(Image.fromarray(gray, "L")), 450)
    for channel in range(3):
        np.testing.assert_array_equal(x[..., channel], gray)


def test_transparency_is_composited_onto_black() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:, :8, 3] = 0  # fully transparent white: must become background black
    rgba[:, 8:, 3] = 255  # opaque white stays white
    rgba[0, 8, 3] = 128  # half transparent: about half the intensity
    x = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 16)
    assert (x[:, :8] == 0).all()
    assert (x[1:, 8:] == 255).all()
    assert 120 <= x[0, 8, 0] <= 136


def test_gray_with_alpha_is_composited_onto_black() -> None:
    la = np.zeros((16, 16, 2), dtype=np.uint8)
    la[..., 0] = 200
    la[:, 8:, 1] = 255
    x = decode_image(encode(Image.fromarray(la, "LA"), "PNG"), 16)
    assert (x[:, :8] == 0).all()
    assert (x[:, 8:] == 200).all()


def test_palette_images_keep_their_colours() -> None:
    image = solid_rgb(32, 32, (200, 30, 40))
    image[:, 16:] = (10, 120, 250)
    palette = Image.fromarray(image).quantize(colors=4)
    assert palette.mode == "P"
    x = decode_image(encode(palette, "BMP"), 32)
    np.testing.assert_array_equal(x, image)


def test_palette_transparency_is_composited_onto_black() -> None:
    palette = Image.fromarray(solid_rgb(16, 16, (250, 250, 250))).quantize(colors=2)
    data = encode(palette, "PNG", transparency=int(palette.getpixel((0, 0))))  # type: ignore[arg-type]
    assert (decode_image(data, 16) == 0).all()


def test_16_bit_images_are_scaled_not_clipped() -> None:
    values = np.zeros((16, 16), dtype=np.uint16)
    values[:, 4:8] = 128 * 257  # mid grey on the 16-bit scale
    values[:, 8:12] = 1000  # dark: clipping at 255 would make it white
    values[:, 12:] = 65535
    im = Image.fromarray(values)
    assert im.mode.startswith("I;16")
    x = decode_image(encode(im, "PNG"), 16)
    assert (x[:, :4] == 0).all()
    assert (x[:, 4:8] == 128).all()
    assert (x[:, 8:12] == round(1000 * 255 / 65535)).all()
    assert (x[:, 12:] == 255).all()


def test_32_bit_integer_images_are_read_on_the_16_bit_scale() -> None:
    values = np.full((16, 16), 255 * 257, dtype=np.int32)
    x = decode_image(encode(Image.fromarray(values, "I"), "TIFF"), 16)
    assert (x == 255).all()


def test_jpeg_is_decoded_at_reduced_scale_to_the_right_size() -> None:
    image = solid_rgb(900, 1000, (40, 160, 90))
    x = decode_image(encode(image, "JPEG", quality=95), SIZE)
    assert x.shape == (SIZE, SIZE, 3)
    assert np.abs(x.astype(int) - (40, 160, 90)).max() <= 4


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "not a recognised image"),
        (b"cell_id,label\n1,all\n", "not a recognised image"),
        (encode(solid_rgb(1, 1, (255, 255, 255))), "smaller than 8x8"),
        (encode(solid_rgb(7, 200, (255, 255, 255))), "smaller than 8x8"),
    ],
    ids=["empty", "pdf", "text", "1x1", "7x200"],
)
def test_bad_input_is_a_decode_error_naming_the_source(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as caught:
        decode_image(data, SIZE, source="s3://lab/sample-7/cell_3.bmp")
    assert caught.value.source == "s3://lab/sample-7/cell_3.bmp"
    assert reason in caught.value.reason
    assert "s3://lab/sample-7/cell_3.bmp" in str(caught.value)
    assert isinstance(caught.value, AllscoreError)


def test_a_truncated_bmp_is_a_decode_error(cells: list[Path]) -> None:
    data = cells[0].read_bytes()
    with pytest.raises(DecodeError, match="truncated or corrupt") as caught:
        decode_image(data[: len(data) // 2], SIZE, source="half.bmp")
    assert caught.value.source == "half.bmp"


@pytest.mark.parametrize("header", [bmp_header_only, png_header_only], ids=["bmp", "png"])
def test_a_huge_declared_size_is_refused_before_decoding(header: object, monkeypatch: pytest.MonkeyPatch) -> None:
    # Our guard must hold even where Pillow's own global limit is switched off.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = header(100_000, 100_000)  # type: ignore[operator]
    assert len(data) < 200
    with pytest.raises(DecodeError, match="100000x100000") as caught:
        decode_image(data, SIZE, source="bomb")
    assert "pixels" in caught.value.reason


def test_a_huge_declared_size_is_refused_with_pillows_guard_on() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_image(png_header_only(100_000, 100_000), SIZE, source="bomb.png")
    assert caught.value.source == "bomb.png"


def test_the_pixel_limit_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(solid_rgb(64, 64, (1, 2, 3)))
    monkeypatch.setenv("ALLSCORE_MAX_IMAGE_PIXELS", str(64 * 64 - 1))
    reset_settings_cache()
    with pytest.raises(DecodeError, match="over the limit of 4095"):
        decode_image(data, SIZE)
    # An explicit limit wins over the settings.
    assert decode_image(data, SIZE, max_pixels=64 * 64).shape == (SIZE, SIZE, 3)


def test_load_image_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bmp"
    with pytest.raises(DecodeError, match=r"nope\.bmp") as caught:
        load_image(missing, SIZE)
    assert caught.value.source == str(missing)


def test_a_size_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="size must be"):
        decode_image(encode(solid_rgb(8, 8, (0, 0, 0))), 0)


def _top_down(bmp: bytes) -> bytes:
    """The same 24-bit BMP stored top-down (negative height), as some writers save it."""
    offset = int.from_bytes(bmp[10:14], "little")
    width = int.from_bytes(bmp[18:22], "little", signed=True)
    height = int.from_bytes(bmp[22:26], "little", signed=True)
    stride = (width * 3 + 3) // 4 * 4
    rows = [bmp[offset + i * stride : offset + (i + 1) * stride] for i in range(height)]
    header = bytearray(bmp[:offset])
    header[22:26] = (-height).to_bytes(4, "little", signed=True)
    return bytes(header) + b"".join(reversed(rows))


def test_a_bmp_cell_gives_the_same_model_input_as_the_same_pixels_in_png(cells: list[Path]) -> None:
    # Uncompressed 24-bit BMPs (the C-NMC format) are unpacked without Pillow's file plugin; the pixels must
    # be exactly what the plugin gives, so a lab that converts its cells to PNG sees the same scores.
    for path in cells[:6]:
        with Image.open(path) as im:
            assert (im.format, im.mode) == ("BMP", "RGB")
            pixels = np.asarray(im.convert("RGB"))
        data = path.read_bytes()
        for size in (SIZE, 450):
            np.testing.assert_array_equal(decode_image(data, size), decode_image(encode(pixels, "PNG"), size))


@pytest.mark.parametrize("width,height", [(451, 450), (450, 453), (601, 600), (97, 130)])
def test_padded_rows_and_top_down_bmps_decode_like_png(width: int, height: int) -> None:
    # Widths that are not a multiple of 4 pad each BMP row; a negative height stores rows top-down.
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = decode_image(encode(pixels, "PNG"), SIZE)
    bmp = encode(pixels)
    np.testing.assert_array_equal(decode_image(bmp, SIZE), expected)
    np.testing.assert_array_equal(decode_image(_top_down(bmp), SIZE), expected)
    with Image.open(io.BytesIO(_top_down(bmp))) as im:  # the crafted file is one Pillow reads the same way
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), pixels)


def _pillow_model_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """What Pillow itself makes of these pixels: the central field, box-reduced and resampled bilinearly."""
    height, width = pixels.shape[:2]
    side = min(width, height, 450)
    left, top = (width - side) // 2, (height - side) // 2
    im = Image.fromarray(pixels, "RGB").crop((left, top, left + side, top + side))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=1.0)
    return np.asarray(im)


@pytest.mark.parametrize("size", [8, 32, 100, 128, 150, 224, 450])
@pytest.mark.parametrize("width,height", [(450, 450), (451, 450), (601, 600), (97, 130), (8, 8)])
def test_the_bmp_kernel_gives_pillows_pixels_bit_for_bit(width: int, height: int, size: int) -> None:
    # 24-bit BMPs are decoded by core/_cellkernel.c, not Pillow; it must give Pillow's output exactly: the
    # same model input in training and serving, and the same as any other format. The sizes cover box
    # reduces with partial last boxes (450 -> 32 reduces by 14, 450 -> 100 by 4), none (450 -> 224), an
    # exact reduce with nothing left to resample (450 -> 150), upscaling (97 -> 128) and a copy (450 -> 450).
    pixels = np.random.default_rng(width * 1000 + size).integers(0, 256, (height, width, 3), dtype=np.uint8)
    bmp = encode(pixels)
    np.testing.assert_array_equal(decode_image(bmp, size), _pillow_model_input(pixels, size))
    np.testing.assert_array_equal(decode_image(_top_down(bmp), size), _pillow_model_input(pixels, size))


def test_a_bmp_reduced_beyond_the_kernels_factor_still_decodes_like_pillow() -> None:
    # A 1x1 model input reduces a 450x450 field by 450, more than the kernel sums in 16 bits: Pillow's path.
    pixels = np.random.default_rng(1).integers(0, 256, (450, 450, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(pixels), 1), _pillow_model_input(pixels, 1))


def test_the_bmp_kernel_decodes_real_cells_like_pillow(cells: list[Path]) -> None:
    for path in cells:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(decode_image(path.read_bytes(), SIZE), _pillow_model_input(pixels, SIZE))


def test_the_bmp_kernel_refuses_arguments_outside_its_buffers() -> None:
    # decode_image checks the header first; the kernel checks again rather than read or write out of bounds.
    from core import _cellkernel

    bmp = encode(solid_rgb(16, 16, (1, 2, 3)))
    out = np.empty((8, 8, 3), dtype=np.uint8)
    _cellkernel.bmp24_field(bmp, 54, 48, True, 16, 0, 0, 16, 2, 8.0, 8, out)
    assert (out == (1, 2, 3)).all()
    for args in (
        (bmp[:-1], 54, 48, True, 16, 0, 0, 16, 2, 8.0, 8, out),  # pixel array one byte short
        (bmp, 54, 48, True, 16, 1, 0, 16, 2, 8.0, 8, out),  # field wider than the rows
        (bmp, 54, 48, True, 16, 0, 1, 16, 2, 8.0, 8, out),  # field taller than the image
        (bmp, 54, 48, True, 16, 0, 0, 16, 2, 8.0, 9, out),  # output buffer of the wrong size
        (bmp, 54, 48, True, 16, 0, 0, 16, 2, 9.0, 8, out),  # resample box beyond the reduced field
        (bmp, 54, 48, True, 16, 0, 1, 2**31 - 1, 2, 8.0, 8, out),  # a field whose bottom overflows an int
        (bmp, 54, 2**62, True, 16, 0, 0, 16, 2, 8.0, 8, out),  # rows whose total overflows the buffer's length
    ):
        with pytest.raises(ValueError, match="outside the bitmap or the output"):
            _cellkernel.bmp24_field(*args)


def test_other_bmp_kinds_still_decode() -> None:
    rgba = np.full((40, 40, 4), 255, dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)  # a 32-bit BMP
    bmp32 = encode(Image.fromarray(rgba, "RGBA"))
    assert int.from_bytes(bmp32[28:30], "little") == 32
    assert (decode_image(bmp32, 40) == (10, 200, 30)).all()
    gray = np.full((40, 40), 77, dtype=np.uint8)  # 8-bit palette BMP
    assert (decode_image(encode(Image.fromarray(gray, "L")), 40) == 77).all()


def test_a_bmp_with_a_short_pixel_array_is_a_decode_error_naming_it(cells: list[Path]) -> None:
    data = cells[1].read_bytes()
    with pytest.raises(DecodeError, match="truncated or corrupt") as caught:
        decode_image(data[:-1000], SIZE, source="cut.bmp")
    assert caught.value.source == "cut.bmp"


def test_without_the_kernel_bmps_decode_with_pillow_to_the_same_pixels_and_say_so_once(
    cells: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import core.imaging as imaging

    with_kernel = [decode_image(path.read_bytes(), SIZE) for path in cells[:4]]
    assert imaging.decode_kernel_available()
    monkeypatch.setattr(imaging, "_cellkernel", None)
    monkeypatch.setattr(imaging, "_KERNEL_MISSING", "no compiler")
    monkeypatch.setattr(imaging, "_kernel_noted", False)
    with caplog.at_level("WARNING", logger="core.imaging"):
        without = [decode_image(path.read_bytes(), SIZE) for path in cells[:4]]
    assert not imaging.decode_kernel_available()
    for a, b in zip(with_kernel, without, strict=True):
        np.testing.assert_array_equal(a, b)
    notes = [r.getMessage() for r in caplog.records if "decode kernel" in r.getMessage()]
    assert len(notes) == 1 and "no compiler" in notes[0] and "Pillow" in notes[0]


def test_a_field_cut_short_is_refused_and_one_with_bytes_after_its_end_reads(tmp_path: Path) -> None:
    from core.imaging import decode_field

    png = tmp_path / "field.png"
    with Image.open(sorted(BCCD_FIELDS.glob("*.jpg"))[0]) as im:
        rgb = np.asarray(im.convert("RGB"))
        jpeg = encode(im.convert("RGB"), "JPEG", quality=92)
    Image.fromarray(rgb).save(png)
    for name, data in {"field.jpg": jpeg, "field.png": png.read_bytes()}.items():
        with pytest.raises(DecodeError, match="truncated") as info:
            decode_field(data[: len(data) // 2], source=name)
        assert info.value.source == name
        with Image.open(io.BytesIO(data)) as im:
            whole = np.asarray(im.convert("RGB"))
        assert np.array_equal(decode_field(data + b"\0" * 64, source=name), whole), name

"""Decode one cell image into the model's input: the preprocessing shared by training and serving."""

from __future__ import annotations

import io
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import AllscoreError
from core.settings import get_settings

log = logging.getLogger(__name__)

_cellkernel: Any
try:
    from core import _cellkernel
except ImportError as exc:  # installed without a C compiler, or a kernel built for another Python: Pillow decodes
    _cellkernel = None
    _KERNEL_MISSING = str(exc)
else:
    _KERNEL_MISSING = ""
_kernel_noted = False


def decode_kernel_available() -> bool:
    """Whether the C decode kernel for 24-bit BMPs is built (else Pillow decodes them: the same pixels, slower)."""
    return _cellkernel is not None


def _note_missing_kernel() -> None:
    global _kernel_noted
    if not _kernel_noted:
        _kernel_noted = True
        log.warning(
            "allscore's image decode kernel (core/_cellkernel.c) is not built (%s): 24-bit BMPs are decoded with "
            "Pillow, the same pixels at about 3x the CPU; reinstall with a C compiler (gcc) to build it",
            _KERNEL_MISSING,
        )


# The C-NMC framing: a 450x450 field around one cell. Larger images are cropped to it, not shrunk.
NOMINAL_SIDE = 450

# An image smaller than this on either side cannot hold a cell; resizing it up would invent one.
MIN_SIDE = 8
# A field whose pixels all lie within this many grey levels of each other is blank (no specimen).
BLANK_RANGE = 12

# Only raster formats a microscope pipeline writes; this also keeps Pillow away from plugins such as
# EPS, which shells out to Ghostscript on untrusted input.
ALLOWED_FORMATS = ("BMP", "PNG", "JPEG", "TIFF", "GIF", "WEBP")

_HINT = "check that it is a complete BMP, PNG, JPEG or TIFF image of one cell"

# BITMAPINFOHEADER and its later versions (V2, V3, V4, V5): width, height, planes, bits, compression follow.
_BMP_INFO_SIZES = (40, 52, 56, 108, 124)

# Pillow box-reduces by the whole factor that leaves at least this many times the output size.
REDUCING_GAP = 1.0

# The kernel sums up to this many BMP rows in 16 bits (255 x 255 fits).
_KERNEL_MAX_FACTOR = 255


class DecodeError(AllscoreError):
    """An image could not be turned into a model input; names the source and the reason."""

    def __init__(self, source: str, reason: str, hint: str = _HINT) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot decode image {source}: {reason}; {hint}")


def _to_8bit(values: np.ndarray) -> np.ndarray:
    """Scale 0..65535 onto 0..255 (v * 255 / 65535, rounded), rather than clipping at 255."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(im: Image.Image, source: str) -> Image.Image:
    """Any supported mode as 8-bit RGB; transparent pixels become black, like the cells' background."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        # Mode I (32-bit) comes from 16-bit TIFFs and old PNG readers: read it on the 16-bit scale too.
        return Image.fromarray(_to_8bit(np.asarray(im)), mode="L").convert("RGB")
    if mode == "F":
        raise DecodeError(
            source, "floating-point pixels have no fixed intensity scale", "save the image as 8-bit or 16-bit"
        )
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("RGBa", "La"):
        # Already premultiplied by alpha: that is exactly the composite onto black.
        return im.convert("RGB")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGB", im.size, (0, 0, 0))
        background.paste(im.convert("RGB"), mask=im.getchannel("A"))
        return background
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise DecodeError(source, f"unsupported pixel mode {mode!r} ({exc})") from exc


@dataclass(frozen=True)
class _BmpField:
    """An uncompressed 24-bit BMP's pixel array, and the field of it the model sees, as the kernel takes them."""

    offset: int
    stride: int
    height: int
    bottom_up: bool
    left: int
    top: int
    side: int
    factor: int  # the box reduce, as Image.resize would choose it


def _plain_bmp(data: bytes, limit: int, size: int) -> _BmpField | None:
    """Where the field of an uncompressed 24-bit BMP (the C-NMC format) lies, if its pixel array is complete.

    Anything else (other depths, compression, bitfields, a short file) returns None and takes Pillow's
    general path, which also gives the errors; so does a reduce the kernel does not take (a model input
    under 2x2 pixels).
    """
    if len(data) < 54 or data[:2] != b"BM":
        return None
    offset, info_size, width, height, _planes, bits, compression = struct.unpack_from("<I I i i H H I", data, 10)
    if info_size not in _BMP_INFO_SIZES or bits != 24 or compression != 0:
        return None
    rows = abs(height)
    if width < MIN_SIDE or rows < MIN_SIDE or width * rows > limit:
        return None  # the general path refuses it with the reason
    stride = (width * 3 + 3) // 4 * 4
    if offset < 14 + info_size or offset + stride * rows > len(data):
        return None
    left, top, right, _bottom = _crop_box(width, rows)
    side = right - left
    factor = int(side / size / REDUCING_GAP) or 1  # Image.resize's own choice
    if factor > _KERNEL_MAX_FACTOR:
        return None
    # Rows are stored bottom-up unless the height is negative.
    return _BmpField(offset, stride, rows, height > 0, left, top, side, factor)


def _decode_plain_bmp(data: bytes, bmp: _BmpField, size: int) -> np.ndarray:
    """The model input of a plain 24-bit BMP, through the native kernel (core/_cellkernel.c).

    It computes what ``_resized`` computes with Pillow for the same field (box-reduce by the whole factor
    Pillow's ``reducing_gap=1.0`` picks, then one bilinear pass), bit for bit, straight from the BGR bytes and
    without the GIL, at about a third of Pillow's CPU per cell (bench/README.md, runs 7-11): it matters when the
    model itself is fast (bfloat16 on AMX).
    """
    out = np.empty((size, size, 3), dtype=np.uint8)
    # The reduced field's width goes on as a float, as Image.resize passes it to the resample.
    extent = bmp.side / bmp.factor
    _cellkernel.bmp24_field(
        data,
        bmp.offset,
        bmp.stride,
        bmp.bottom_up,
        bmp.height,
        bmp.left,
        bmp.top,
        bmp.side,
        bmp.factor,
        extent,
        size,
        out,
    )
    return out


def _crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square the model sees: the nominal 450x450 field, or the largest square if smaller."""
    side = min(width, height, NOMINAL_SIDE)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def decode_image(data: bytes, size: int, *, source: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes into an RGB uint8 array of shape (size, size, 3).

    The model sees the central 450x450 field (the C-NMC framing), scaled to size x size with one
    antialiased bilinear resample. Larger images (600x600 in the C-NMC final test set) are
    center-cropped to that field, which keeps a cell's scale; smaller or non-square ones are
    center-cropped to their largest square and resized. Neither is rejected. Grayscale, palette,
    16-bit (scaled, not clipped) and transparent images (composited onto black, the cells'
    background) become RGB.

    Refused with DecodeError: empty or truncated data, formats outside ALLOWED_FORMATS, images whose
    header declares more than ``max_pixels`` pixels (default ``settings.max_image_pixels``; checked
    before any pixel is decoded), and images under 8x8: one that small cannot show a cell, and
    scaling it up would feed the model an invented one.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not data:
        raise DecodeError(source, "the file is empty")
    limit = get_settings().max_image_pixels if max_pixels is None else max_pixels
    bmp = _plain_bmp(data, limit, size)
    if bmp is not None:
        if _cellkernel is not None:
            return _decode_plain_bmp(data, bmp, size)
        _note_missing_kernel()
    return _resized(_open_rgb(data, size, source, limit), size, source)


def _open_checked(data: bytes, source: str, limit: int, too_big_hint: str) -> Image.Image:
    """The image's header parsed (no pixel decoded yet), refused if not allowed, over `limit` pixels or tiny."""
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise DecodeError(source, f"not a recognised image ({', '.join(ALLOWED_FORMATS)})") from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own global guard fired first; ours below would have refused it too.
        raise DecodeError(source, f"declared size is too large ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise DecodeError(source, f"unreadable image header ({exc})") from exc
    width, height = im.size
    if width * height > limit:
        im.close()
        raise DecodeError(
            source,
            f"declared size {width}x{height} is {width * height} pixels, over the limit of {limit}",
            too_big_hint,
        )
    if min(width, height) < MIN_SIDE:
        im.close()
        raise DecodeError(source, f"{width}x{height} is smaller than {MIN_SIDE}x{MIN_SIDE} and cannot show a cell")
    return im


def _open_rgb(data: bytes, size: int, source: str, limit: int) -> Image.Image:
    """Any allowed format through Pillow's plugins: checked, decoded, cropped to the field, as RGB."""
    im = _open_checked(
        data, source, limit, "a cell image is about 450x450; raise ALLSCORE_MAX_IMAGE_PIXELS only for trusted input"
    )
    with im:
        width, height = im.size
        box: tuple[float, float, float, float] = _crop_box(width, height)
        side = box[2] - box[0]
        if im.format == "JPEG" and side >= 2 * size:
            # libjpeg can decode at 1/2, 1/4 or 1/8 scale, leaving at least size pixels across the crop.
            im.draft(im.mode, (math.ceil(size * width / side), math.ceil(size * height / side)))
            if im.size != (width, height):
                # The reduction is 2, 4 or 8 with the size rounded up, so rounding recovers it exactly.
                factor = round(width / im.size[0])
                box = (box[0] / factor, box[1] / factor, box[2] / factor, box[3] / factor)
        try:
            im.load()
            rgb = _to_rgb(im, source)
        except DecodeError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            raise DecodeError(source, f"the pixel data is truncated or corrupt ({exc})") from exc
    # Crop, then resize: pixels outside the field must not leak into its edges through the filter.
    crop = (round(box[0]), round(box[1]), round(box[2]), round(box[3]))
    if crop != (0, 0, *rgb.size):
        rgb = rgb.crop(crop)
    return rgb


def _resized(rgb: Image.Image, size: int, source: str) -> np.ndarray:
    """The field, already cropped, as a size x size RGB array."""
    out_image = rgb
    if rgb.size != (size, size):
        # Pillow first box-reduces by the largest whole factor (450 -> 150 for 128), then resamples
        # bilinearly: about half the CPU of a full bilinear pass, within 0.2 grey levels of it (bench/README.md,
        # "Before and after"). Decoding runs on the cores the model needs, so its cost shows in cells/s.
        out_image = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    out = np.array(out_image, dtype=np.uint8)
    expected = (size, size, 3)
    # Pillow's contract, but the model depends on it: fail here rather than deep inside a batch.
    if out.shape != expected:
        raise DecodeError(source, f"decoded to shape {out.shape}, expected {expected}")
    return out


def load_image(path: str | Path, size: int, *, max_pixels: int | None = None) -> np.ndarray:
    """Read a local image file and decode it with decode_image."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DecodeError(str(path), f"cannot read the file ({exc.strerror or exc})", "check the path") from exc
    return decode_image(data, size, source=str(path), max_pixels=max_pixels)


def decode_field(data: bytes, *, source: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode a microscope field (any size, any allowed format) into a whole RGB uint8 array, uncropped.

    The same guards as decode_image (empty, not an image, over the pixel limit before any pixel is decoded,
    truncated, under 8x8), and one of its own: a blank field (one colour, such as all black or all white)
    holds no specimen and is refused, while a smear with no white cell is not an error (it has 0 cells).
    """
    if not data:
        raise DecodeError(source, "the file is empty")
    limit = get_settings().max_image_pixels if max_pixels is None else max_pixels
    im = _open_checked(
        data, source, limit, "split the field into tiles, or raise ALLSCORE_MAX_IMAGE_PIXELS for trusted input"
    )
    with im:
        try:
            im.load()
            rgb = np.asarray(_to_rgb(im, source), dtype=np.uint8)
        except DecodeError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
            raise DecodeError(source, f"the pixel data is truncated or corrupt ({exc})") from exc
    low, high = int(rgb.min()), int(rgb.max())
    if high - low < BLANK_RANGE:
        raise DecodeError(
            source,
            f"the field is blank (every pixel within {low}-{high}): no specimen to find cells in",
            "check the camera's exposure and the file",
        )
    return rgb


def model_input(crop: np.ndarray, size: int, *, source: str = "<array>") -> np.ndarray:
    """A C-NMC-style crop (RGB uint8, any square side) at the model's size, resampled as decode_image does."""
    return _resized(Image.fromarray(crop), size, source)

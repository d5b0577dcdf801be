"""Small helpers shared by the tests: encoded images, the real-cell sample folder, the CI service rule."""

from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The 24 real C-NMC cells live in the repository (CC BY 3.0, credit in its README), so a fresh clone tests them.
CNMC_SAMPLE = REPO_ROOT / "tests" / "data" / "cnmc"
# Real smear fields from BCCD (MIT licence, LICENSE beside them), copied from ../shared for the same reason.
BCCD_FIELDS = REPO_ROOT / "tests" / "data" / "bccd" / "JPEGImages"


def under_ci() -> bool:
    """Whether the tests run under CI, where a missing service or data set is a failure, not a skip."""
    return os.environ.get("CI") == "true"


def require_service(name: str, reachable: bool, reason: str) -> None:
    """Skip the test when a service or data set is missing; fail instead under CI (CI=true)."""
    if reachable:
        return
    if under_ci():
        pytest.fail(f"{name} is required under CI but unavailable: {reason}")
    pytest.skip(f"{name} unavailable: {reason}")


def cnmc_cells() -> list[Path]:
    """The real C-NMC cells in tests/data/cnmc/{all,hem}; skips (fails under CI) when absent."""
    cells = sorted(CNMC_SAMPLE.glob("*/*.bmp"))
    require_service("C-NMC sample", bool(cells), f"no .bmp files under {CNMC_SAMPLE}")
    return cells


def encode(array_or_image: np.ndarray | Image.Image, fmt: str = "BMP", **save_args: object) -> bytes:
    """Encode an array or a Pillow image in the given format."""
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    im.save(buf, fmt, **save_args)
    return buf.getvalue()


def solid_rgb(width: int, height: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """A width x height RGB array of one colour."""
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[...] = rgb
    return out


def bmp_header_only(width: int, height: int) -> bytes:
    """A 24-bit BMP header that declares width x height but carries (almost) no pixel data."""
    row = (width * 3 + 3) // 4 * 4
    image_size = row * height
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, image_size & 0xFFFFFFFF, 2835, 2835, 0, 0)
    file_header = struct.pack("<2sIHHI", b"BM", (54 + image_size) & 0xFFFFFFFF, 0, 0, 54)
    return file_header + info + b"\x00" * 16


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (correct CRC) declaring width x height, then a tiny IDAT and IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def stop_process_group(proc: subprocess.Popen[bytes] | None, timeout: float, kill_wait: float = 10.0) -> None:
    """SIGTERM a process started with start_new_session=True; SIGKILL its whole group if it outlives timeout."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(kill_wait)

"""core.storage.Fetcher: what the worker's I/O threads and the montage read cells with."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.imaging import decode_image
from core.settings import Settings
from core.storage import Fetcher, InvalidURI, ObjectNotFound
from tests.helpers import encode


def test_io_threads_read_each_cell_as_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cells = {}
    for i in range(24):
        pixels = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)
        path = tmp_path / f"cell {i}.bmp"
        path.write_bytes(encode(pixels))
        cells[path.as_uri() if i % 2 else str(path)] = pixels
    fetch = Fetcher(Settings())
    with ThreadPoolExecutor(4) as pool:
        decoded = dict(zip(cells, pool.map(lambda uri: decode_image(fetch(uri), 60, source=uri), cells), strict=True))
    for uri, pixels in cells.items():
        np.testing.assert_array_equal(decoded[uri], pixels, err_msg=uri)


def test_a_missing_file_and_an_unknown_scheme_are_typed_errors(tmp_path: Path) -> None:
    fetch = Fetcher(Settings())
    with pytest.raises(ObjectNotFound, match=r"nothing\.bmp"):
        fetch(str(tmp_path / "nothing.bmp"))
    with pytest.raises(InvalidURI, match="http"):
        fetch("http://lab.example/cell.bmp")

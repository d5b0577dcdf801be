"""Decode a data set's cells into arrays at the model's input size (the same decode path as serving)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.imaging import DecodeError, load_image
from trainer.dataset import CellRecord

log = logging.getLogger(__name__)


@dataclass
class CellArrays:
    """Decoded images with their labels and subjects; cells that failed to decode are left out and named."""

    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int, 1 = all
    subjects: list[str | None]
    failed: list[tuple[str, str]]


def decode_cells(
    cells: Sequence[CellRecord],
    size: int,
    *,
    workers: int = 2,
    on_progress: Callable[[int], None] | None = None,
) -> CellArrays:
    """Decode every cell (threads: Pillow releases the GIL while decoding); skip and name unreadable ones."""
    images = np.zeros((len(cells), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(cells), dtype=bool)
    failed: list[tuple[str, str]] = []

    def one(i: int) -> None:
        try:
            images[i] = load_image(cells[i].path, size)
            ok[i] = True
        except DecodeError as exc:
            failed.append((str(cells[i].path), exc.reason))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for n, _ in enumerate(pool.map(one, range(len(cells))), start=1):
            if on_progress and (n % 64 == 0 or n == len(cells)):
                on_progress(n)
    if failed:
        log.warning(
            "%d cells could not be decoded and were left out: %s",
            len(failed),
            ", ".join(p for p, _ in failed[:10]) + (" ..." if len(failed) > 10 else ""),
        )
    labels = np.array([c.label if c.label is not None else -1 for c in cells], dtype=np.int64)
    return CellArrays(
        images=images[ok],
        labels=labels[ok],
        subjects=[c.subject for c, good in zip(cells, ok, strict=True) if good],
        failed=failed,
    )

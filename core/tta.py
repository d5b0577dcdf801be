"""Test-time augmentation: a cell has no orientation, so its p(ALL) can be averaged over the 8 flips and rotations
of its image (the dihedral group of the square), the same transforms the trainer augments with. It costs one forward
pass per view; what it buys is measured by bench/quality.py (bench/README.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

VIEWS = (1, 8)


def dihedral_views(batch: np.ndarray, views: int = 8) -> Iterator[np.ndarray]:
    """The batch (N, H, W, C) as each of the first `views` of: itself, rotated 90/180/270 degrees, and the four
    mirror images of those; each a contiguous copy, in the same shape (square images)."""
    if views not in VIEWS:
        raise ValueError(f"test-time augmentation takes {' or '.join(map(str, VIEWS))} views, not {views}")
    if batch.ndim != 4 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"need a batch of square images (N, S, S, C), got shape {batch.shape}")
    for k in range(views):
        view = np.rot90(batch, k % 4, axes=(1, 2))
        if k >= 4:
            view = view[:, :, ::-1]
        yield np.ascontiguousarray(view)


def averaged(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, views: int = 1) -> np.ndarray:
    """predict(batch), or its mean over the batch's dihedral views."""
    if views == 1:
        return predict(batch)
    return np.mean([predict(view) for view in dihedral_views(batch, views)], axis=0)

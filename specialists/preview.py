"""A PNG grid of samples, one row per class, to look at a data source."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import DataBundle
from .storage import atomic_path

__all__ = ["save_sample_grid"]


def save_sample_grid(
    bundle: DataBundle, path: str | Path, *, n_classes: int = 20, per_class: int = 8, scale: int = 2
) -> None:
    """Write a PNG of up to ``per_class`` training images of each of the first ``n_classes``."""
    from PIL import Image

    imgs, labels = bundle.train.images, bundle.train.labels
    rows = []
    for c in range(min(n_classes, bundle.n_classes)):
        idx = np.flatnonzero(labels == c)[:per_class]
        tiles = [imgs[i] for i in idx] + [np.zeros_like(imgs[0])] * (per_class - len(idx))
        tiles = [np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    im = Image.fromarray(grid)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")

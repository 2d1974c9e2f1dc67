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
    """Write a PNG of up to ``per_class`` training images of each of the first ``n_classes``,
    one row per class, labelled with its index and name (and coarse group, when known)."""
    from PIL import Image, ImageDraw, ImageFont

    imgs, labels = bundle.train.images, bundle.train.labels
    rows, names = [], []
    for c in range(min(n_classes, bundle.n_classes)):
        idx = np.flatnonzero(labels == c)[:per_class]
        tiles = [imgs[i] for i in idx] + [np.zeros_like(imgs[0])] * (per_class - len(idx))
        tiles = [np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
        name = f"{c}: {bundle.class_names[c]}"
        if bundle.coarse is not None and bundle.coarse_names is not None:
            name += f" [{bundle.coarse_names[int(bundle.coarse[c])]}]"
        names.append(name if len(name) <= 40 else name[:39] + "…")
    grid = np.concatenate(rows, axis=0)
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    im = Image.fromarray(grid)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    row_h = im.height // len(rows)
    font = ImageFont.load_default(size=max(8, min(14, row_h - 4)))
    draw = ImageDraw.Draw(im)
    label_w = int(max(draw.textlength(n, font=font) for n in names)) + 12
    out = Image.new("RGB", (label_w + im.width, im.height), "white")
    out.paste(im, (label_w, 0))
    draw = ImageDraw.Draw(out)
    for r, name in enumerate(names):
        draw.text((6, r * row_h + row_h // 2), name, fill="black", font=font, anchor="lm")
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")

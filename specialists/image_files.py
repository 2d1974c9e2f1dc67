"""Reading user image files for prediction, with one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SpecialistsError

__all__ = ["RESIZE_MODES", "read_image", "read_images"]


RESIZE_MODES = ("crop", "squash")


def read_image(path: str | Path, size: int, channels: int, resize: str = "squash") -> np.ndarray:
    """Decode one file, convert it (RGB or grayscale, alpha over black) and resize it:
    uint8 (size, size, channels); a missing or unreadable file is one clear error. ``resize``:
    ``crop`` keeps the aspect ratio (the centred square, resized, as timm's evaluation
    transform does), ``squash`` resizes the whole image to the square."""
    from PIL import Image, UnidentifiedImageError

    if resize not in RESIZE_MODES:
        raise SpecialistsError(f"resize={resize}: must be one of {', '.join(RESIZE_MODES)}")
    p = Path(path)
    if not p.is_file():
        raise SpecialistsError(f"{p}: file not found")
    try:
        with Image.open(p) as im:
            if resize == "crop" and im.format == "JPEG":  # a reduced scale still >= size
                im.draft(im.mode, (size, size))
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            box = None
            if resize == "crop" and w != h:
                s = min(w, h)
                box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            if im.size != (size, size) or box is not None:
                im = im.resize((size, size), Image.BILINEAR, box=box)
            arr = np.asarray(im, dtype=np.uint8)
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as e:
        raise SpecialistsError(f"{p}: unreadable image ({type(e).__name__}: {e})") from e
    return arr.reshape(size, size, channels)


def read_images(
    paths: list[str | Path], size: int, channels: int, resize: str = "squash"
) -> np.ndarray:
    """``read_image`` of every path: uint8 (N, size, size, C); the first bad file stops it."""
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, size, channels, resize)
    return out

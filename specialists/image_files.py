"""Reading user image files for prediction, with one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SpecialistsError

__all__ = ["read_image", "read_images"]


def read_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """Decode one file, convert it (RGB or grayscale, alpha over black) and resize it:
    uint8 (size, size, channels); a missing or unreadable file is one clear error."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SpecialistsError(f"{p}: file not found")
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
            im = im.convert("RGB" if channels == 3 else "L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SpecialistsError(f"{p}: unreadable image ({type(e).__name__}: {e})") from e
    return arr.reshape(size, size, channels)


def read_images(paths: list[str | Path], size: int, channels: int) -> np.ndarray:
    """``read_image`` of every path: uint8 (N, size, size, C); the first bad file stops it."""
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, size, channels)
    return out

"""Reading user image files for prediction, with one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SpecialistsError


def read_images(paths: list[str | Path], size: int, channels: int) -> np.ndarray:
    """Decode, convert (RGB or grayscale, alpha over black) and resize: uint8 (N, size, size, C)."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    for i, p in enumerate(paths):
        p = Path(p)
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
        out[i] = arr.reshape(size, size, channels)
    return out

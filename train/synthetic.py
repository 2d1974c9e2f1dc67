"""The embedded default dataset: procedural images of many classes in planted look-alike groups.

Every class belongs to one planted group. Classes of a group share the group's shape, colour and
background; they differ only in a detail (the orientation of a faint stripe texture inside the
shape). Nuisance variation (position, scale, stripe phase, brightness, pixel noise) is drawn per
image. A small generalist therefore learns the groups quickly and confuses classes mostly inside
their group, which is exactly the structure the confusion clustering must recover.

Everything is generated in memory with numpy from one seed, in seconds.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["SyntheticConfig", "generate_split", "group_of_classes", "synthetic_class_names"]

_SHAPES = ("disk", "square", "diamond", "triangle", "ring", "cross", "hbar", "vbar")
_SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of the embedded dataset (the defaults are the documented ones)."""

    n_classes: int = 100
    n_groups: int = 20
    image_size: int = 32
    train_per_class: int = 200
    val_per_class: int = 50
    test_per_class: int = 50
    stripe_contrast: float = 0.35  # amplitude of the class-defining texture (lower = harder)
    noise: float = 0.08  # std of the per-pixel Gaussian noise, in [0, 1] intensity units
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {self.n_classes}")
        if not 1 <= self.n_groups <= self.n_classes:
            raise ValueError(
                f"n_groups must be between 1 and n_classes={self.n_classes}, got {self.n_groups}"
            )
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def per_class(self, split: str) -> int:
        return getattr(self, f"{split}_per_class")


def group_of_classes(cfg: SyntheticConfig) -> np.ndarray:
    """Planted group id of every class: contiguous, as even as possible. Shape (K,)."""
    return (np.arange(cfg.n_classes) * cfg.n_groups) // cfg.n_classes


def synthetic_class_names(cfg: SyntheticConfig) -> list[str]:
    groups = group_of_classes(cfg)
    names = []
    for c in range(cfg.n_classes):
        g = groups[c]
        idx = c - int(np.searchsorted(groups, g))
        names.append(f"g{g:02d}_{_SHAPES[g % len(_SHAPES)]}_{idx}")
    return names


def _group_style(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: shape id, foreground RGB and background RGB, fixed by the seed."""
    rng = np.random.default_rng([cfg.seed, 7919])
    g = np.arange(cfg.n_groups)
    shape = g % len(_SHAPES)
    # Groups that share a shape get hues a golden-ratio step apart, so they stay distinct.
    hue = (rng.random() + (g // len(_SHAPES)) * 0.381966 + shape * 0.09) % 1.0
    fg = np.array([colorsys.hsv_to_rgb(h, 0.75, 0.95) for h in hue])
    bg_value = np.where((g // len(_SHAPES)) % 2 == 0, 0.15, 0.35)
    bg_hue = (hue + 0.5) % 1.0
    bg = np.array([colorsys.hsv_to_rgb(h, 0.3, v) for h, v in zip(bg_hue, bg_value)])
    return shape, fg.astype(np.float32), bg.astype(np.float32)


def _class_angle(cfg: SyntheticConfig) -> np.ndarray:
    """Stripe orientation of every class: evenly spread over 180 degrees inside its group."""
    groups = group_of_classes(cfg)
    angles = np.zeros(cfg.n_classes)
    for g in range(cfg.n_groups):
        members = np.flatnonzero(groups == g)
        offset = (g * 0.37) % 1.0
        angles[members] = np.pi * (np.arange(len(members)) + offset) / len(members)
    return angles


def _shape_mask(shape: np.ndarray, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Soft-edged masks. x, y: (N, H, W) centred coordinates; r: (N, 1, 1) radius."""
    out = np.zeros_like(x)
    ax, ay = np.abs(x), np.abs(y)
    dist = np.sqrt(x**2 + y**2)
    table = {
        0: r - dist,  # disk
        1: r * 0.85 - np.maximum(ax, ay),  # square
        2: r * 1.15 - (ax + ay),  # diamond
        3: np.minimum(np.minimum(y + r * 0.6, r * 0.9 - (y + 1.7 * ax) * 0.9), r),  # triangle
        4: np.minimum(r - dist, dist - r * 0.45),  # ring
        5: np.minimum(np.maximum(r * 0.38 - ax, r * 0.38 - ay), r - np.maximum(ax, ay)),  # cross
        6: np.minimum(r - ax, r * 0.5 - ay),  # horizontal bar
        7: np.minimum(r * 0.5 - ax, r - ay),  # vertical bar
    }
    for sid, signed in table.items():
        sel = shape == sid
        if sel.any():
            out[sel] = np.clip(signed[sel] + 0.5, 0.0, 1.0)
    return out


def generate_split(cfg: SyntheticConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and labels (N,) int64 of one split, deterministic in the seed."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_OFFSETS)}")
    rng = np.random.default_rng([cfg.seed, _SPLIT_OFFSETS[split]])
    n_per = cfg.per_class(split)
    labels = np.repeat(np.arange(cfg.n_classes), n_per)
    labels = labels[rng.permutation(len(labels))]
    shape_of_group, fg, bg = _group_style(cfg)
    group = group_of_classes(cfg)[labels]
    angle = _class_angle(cfg)[labels]

    images = np.empty((len(labels), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    chunk = 2048  # bounds the float32 working memory to a few tens of MB
    for start in range(0, len(labels), chunk):
        sl = slice(start, start + chunk)
        images[sl] = _render(
            cfg, rng, shape_of_group[group[sl]], fg[group[sl]], bg[group[sl]], angle[sl]
        )
    return images, labels.astype(np.int64)


def _render(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    shape: np.ndarray,
    fg: np.ndarray,
    bg: np.ndarray,
    angle: np.ndarray,
) -> np.ndarray:
    n, s = len(shape), cfg.image_size
    coords = np.arange(s, dtype=np.float32) - (s - 1) / 2
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    shift = rng.uniform(-0.12, 0.12, size=(n, 2, 1, 1)).astype(np.float32) * s
    x = xx[None] - shift[:, 0]
    y = yy[None] - shift[:, 1]
    radius = (rng.uniform(0.26, 0.36, size=(n, 1, 1)) * s).astype(np.float32)
    mask = _shape_mask(shape, x, y, radius)[..., None]  # (N, H, W, 1)

    # The class-defining detail: stripe orientation. The period scales with the image.
    period = max(3.0, s / 6.5)
    theta = angle[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    proj = xx[None] * np.cos(theta) + yy[None] * np.sin(theta)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * proj / period + phase)
    texture = (1.0 - cfg.stripe_contrast) + cfg.stripe_contrast * stripes
    foreground = fg[:, None, None, :] * texture[..., None].astype(np.float32)

    background = np.broadcast_to(bg[:, None, None, :], foreground.shape)
    img = mask * foreground + (1 - mask) * background
    img = img * rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
    img = img + rng.normal(0, cfg.noise, size=img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)

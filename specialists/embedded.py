"""The embedded default dataset: procedural images of many classes in planted look-alike groups.

Every class belongs to one planted group (contiguous blocks of class ids, see
:func:`group_of_classes`). The design follows what makes specialists useful on real data (birds
versus cars): classes of a group look alike, and *what* tells them apart differs from group to
group, so a capacity-limited generalist must share a few features between many kinds of fine
distinctions, while a specialist can spend all its capacity on one kind.

- **Group appearance (strong).** Every class of a group shares the group's shape, foreground
  colour and background colour; groups differ in all three (or at least in shape and colour). A
  small generalist learns the groups quickly and makes its errors inside them.
- **Class detail (subtle, of a kind chosen per group).** Group ``g`` uses detail kind
  ``g % 7`` (ring shapes never get the hole detail; it would hide in the ring's own hole):

  ============  ==========================================================================
  ``orient``    orientation of a faint stripe texture (evenly spread over 180 degrees)
  ``freq``      period of the stripe texture (a geometric ladder, ratio ``1 + 0.3 detail``)
  ``dot``       angle of one small light dot around the shape's centre
  ``hole``      radius of a hole in the shape relative to the shape (steps of ``0.035 detail``)
  ``hue``       a small shift of the foreground hue (``0.014 detail`` of the colour circle)
  ``count``     number of small light dots (1, 2, ...) on a randomly rotated circle
  ``aspect``    width-to-height ratio of the shape (log steps of ``0.07 detail``)
  ============  ==========================================================================

  With ``fine_groups = F``, groups 0..F-1 are a **resolution family** instead: the class is the
  orientation of a fine grating of ``fine_cycles`` cycles across the image (evenly spread over
  180 degrees). The grating scales with the image, so whether it can be seen depends on the
  size a model looks at, not on the size rendered: at the default 14 cycles a 32 px view shows
  it (a period of 2.3 px) and a 16 px view cannot (it is past the Nyquist limit and an
  antialiased resize removes it, leaving about 2% of its contrast), so a 16 px generalist
  confuses those classes and a 32 px specialist can tell them apart.

  ``detail`` scales the separation between neighbouring classes (and the dots' contrast);
  ``stripe_contrast`` is the amplitude of the stripe texture, which every group carries: class
  defining in ``orient`` groups (1x) and ``freq`` groups (1.6x), a random distraction at 0.5x
  elsewhere. The constants were tuned so that no kind is trivial and none is hopeless for the
  0.12M-parameter ``test_efficientnet`` (measurements in docs/results.md).
- **Nuisance (per image).** Position, scale, stripe phase (and, where they do not define the
  class, stripe orientation and period), dot-ring rotation, brightness, a small per-channel
  colour gain, and uniform pixel noise of std ``noise``. Class parameters get a small jitter
  too, inside half the step between neighbouring classes, so every class stays separable in
  principle and the errors a small generalist makes are errors a specialist can fix. (At low
  ``detail`` the per-channel gain can blur the smallest hue steps a little.)

Flipping an image changes the class (orientations, dot angles), so the data source disables
horizontal flips. Everything is generated in memory with numpy from one seed, in seconds
(30,000 images of 32 x 32 at the defaults).
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "DETAIL_KINDS",
    "SyntheticConfig",
    "detail_kind_of_groups",
    "generate_split",
    "group_of_classes",
    "synthetic_class_names",
]

_SHAPES = ("disk", "square", "diamond", "triangle", "ring", "cross", "hbar", "vbar")
DETAIL_KINDS = ("orient", "freq", "dot", "hole", "hue", "count", "aspect", "fine")
_CYCLE = DETAIL_KINDS[:7]  # the kinds groups take in turn; "fine" only through fine_groups
FINE_CONTRAST = 0.45  # amplitude of the resolution family's grating
_SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}
_RING = _SHAPES.index("ring")
_HOLE = DETAIL_KINDS.index("hole")


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of the embedded dataset (the defaults are the documented ones)."""

    n_classes: int = 100
    n_groups: int = 20
    image_size: int = 32
    train_per_class: int = 200
    val_per_class: int = 50
    test_per_class: int = 50
    stripe_contrast: float = 0.25  # amplitude of the stripe texture (lower = orient/freq harder)
    detail: float = 0.6  # separation between the classes of a group (lower = harder)
    noise: float = 0.08  # std of the per-pixel (uniform) noise, in [0, 1] intensity units
    fine_groups: int = 0  # groups 0..fine_groups-1 told apart by a grating only fine views see
    fine_cycles: float = 14.0  # the grating's cycles across the image
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
        if not 0.0 <= self.stripe_contrast <= 1.0:
            raise ValueError(f"stripe_contrast must be in [0, 1], got {self.stripe_contrast}")
        if not 0.0 < self.detail <= 3.0:
            raise ValueError(f"detail must be in (0, 3], got {self.detail}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if not 0 <= self.fine_groups <= self.n_groups:
            raise ValueError(
                f"fine_groups must be between 0 and n_groups={self.n_groups}, got {self.fine_groups}"
            )
        if self.fine_groups and not 1.0 <= self.fine_cycles <= self.image_size / 2:
            raise ValueError(
                f"fine_cycles must be between 1 and image_size / 2 = {self.image_size / 2:g} "
                f"(the rendered image must resolve the grating), got {self.fine_cycles}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def per_class(self, split: str) -> int:
        return getattr(self, f"{split}_per_class")


def group_of_classes(cfg: SyntheticConfig) -> np.ndarray:
    """Planted group id of every class: contiguous, as even as possible. Shape (K,)."""
    return (np.arange(cfg.n_classes) * cfg.n_groups) // cfg.n_classes


def detail_kind_of_groups(cfg: SyntheticConfig) -> list[str]:
    """The kind of detail (one of DETAIL_KINDS) that tells the classes of each group apart."""
    kinds = []
    for g in range(cfg.n_groups):
        k = g % len(_CYCLE)
        if g % len(_SHAPES) == _RING and k == _HOLE:
            k = (k + 1) % len(_CYCLE)
        kinds.append("fine" if g < cfg.fine_groups else _CYCLE[k])
    return kinds


def synthetic_class_names(cfg: SyntheticConfig) -> list[str]:
    groups = group_of_classes(cfg)
    kinds = detail_kind_of_groups(cfg)
    names = []
    for c in range(cfg.n_classes):
        g = groups[c]
        idx = c - int(np.searchsorted(groups, g))
        names.append(f"g{g:02d}_{_SHAPES[g % len(_SHAPES)]}_{kinds[g]}{idx}")
    return names


def _class_table(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Per class: shape, kind, colours and the class-defining value of its group's detail."""
    rng = np.random.default_rng([cfg.seed, 7919])
    groups = group_of_classes(cfg)
    kind_of_group = np.array([DETAIL_KINDS.index(k) for k in detail_kind_of_groups(cfg)])
    g = np.arange(cfg.n_groups)
    shape = g % len(_SHAPES)
    # Groups that share a shape get hues a golden-ratio step apart, so they stay distinct.
    hue = (rng.random() + (g // len(_SHAPES)) * 0.381966 + shape * 0.09) % 1.0
    bg_value = np.where((g // len(_SHAPES)) % 2 == 0, 0.15, 0.35)
    bg = np.array([colorsys.hsv_to_rgb((h + 0.5) % 1.0, 0.3, v) for h, v in zip(hue, bg_value)])

    # Rank of each class inside its group, centred (t) and as a fraction of the group (u).
    n_in = np.bincount(groups, minlength=cfg.n_groups)[groups]
    rank = np.arange(cfg.n_classes) - np.searchsorted(groups, groups)
    t = rank - (n_in - 1) / 2.0
    offset = (groups * 0.37) % 1.0  # a per-group rotation of the angle ladders
    kind = kind_of_group[groups]
    d = cfg.detail

    value = np.zeros(cfg.n_classes)
    is_ = {name: kind == i for i, name in enumerate(DETAIL_KINDS)}
    value[is_["orient"]] = (np.pi * (rank + offset) / n_in)[is_["orient"]]
    value[is_["freq"]] = ((1 + 0.3 * d) ** t)[is_["freq"]]  # period multiplier
    value[is_["dot"]] = (2 * np.pi * (rank + offset) / n_in)[is_["dot"]]
    # Hole radius / shape radius: a ladder centred on 0.3, kept inside (0.08, 0.55).
    step = min(0.035 * d, 0.47 / np.maximum(n_in - 1, 1).max())
    value[is_["hole"]] = np.clip(0.3 + step * t, 0.08, 0.55)[is_["hole"]]
    value[is_["hue"]] = (0.014 * d * t)[is_["hue"]]
    value[is_["count"]] = (rank + 1)[is_["count"]]
    value[is_["aspect"]] = np.exp(0.07 * d * t)[is_["aspect"]]
    value[is_["fine"]] = (np.pi * (rank + offset) / n_in)[is_["fine"]]

    class_hue = hue[groups] + np.where(is_["hue"], value, 0.0)
    fg = np.array([colorsys.hsv_to_rgb(h % 1.0, 0.75, 0.95) for h in class_hue])
    return {
        "shape": shape[groups],
        "kind": kind,
        "value": value,
        "n_in": n_in,
        "fg": fg.astype(np.float32),
        "bg": bg[groups].astype(np.float32),
    }


def _shape_mask(shape: np.ndarray, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Soft-edged masks. x, y: (N, H, W) centred coordinates; r: (N, 1, 1) radius."""
    out = np.zeros_like(x)
    for sid in np.unique(shape):
        sel = shape == sid
        xs, ys, rs = x[sel], y[sel], r[sel]
        ax, ay = np.abs(xs), np.abs(ys)
        if sid == 0:  # disk
            signed = rs - np.sqrt(xs**2 + ys**2)
        elif sid == 1:  # square
            signed = rs * 0.85 - np.maximum(ax, ay)
        elif sid == 2:  # diamond
            signed = rs * 1.15 - (ax + ay)
        elif sid == 3:  # triangle
            signed = np.minimum(np.minimum(ys + rs * 0.6, rs * 0.9 - (ys + 1.7 * ax) * 0.9), rs)
        elif sid == 4:  # ring
            dist = np.sqrt(xs**2 + ys**2)
            signed = np.minimum(rs - dist, dist - rs * 0.45)
        elif sid == 5:  # cross
            signed = np.minimum(np.maximum(rs * 0.38 - ax, rs * 0.38 - ay), rs - np.maximum(ax, ay))
        elif sid == 6:  # horizontal bar
            signed = np.minimum(rs - ax, rs * 0.5 - ay)
        else:  # vertical bar
            signed = np.minimum(rs * 0.5 - ax, rs - ay)
        out[sel] = np.clip(signed + 0.5, 0.0, 1.0)
    return out


def generate_split(cfg: SyntheticConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and labels (N,) int64 of one split, deterministic in the seed."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_OFFSETS)}")
    rng = np.random.default_rng([cfg.seed, _SPLIT_OFFSETS[split]])
    n_per = cfg.per_class(split)
    labels = np.repeat(np.arange(cfg.n_classes), n_per)
    labels = labels[rng.permutation(len(labels))]
    table = _class_table(cfg)

    images = np.empty((len(labels), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    chunk = 2048  # bounds the float32 working memory to a few tens of MB
    for start in range(0, len(labels), chunk):
        sl = labels[start : start + chunk]
        images[start : start + chunk] = _render(cfg, rng, {k: v[sl] for k, v in table.items()})
    return images, labels.astype(np.int64)


def _render(cfg: SyntheticConfig, rng: np.random.Generator, c: dict[str, np.ndarray]) -> np.ndarray:
    """Draw one chunk; ``c`` holds the class table's rows of every image."""
    n, s = len(c["shape"]), cfg.image_size
    f32 = np.float32
    kind, value, n_in = c["kind"], c["value"], c["n_in"]
    is_ = {name: kind == i for i, name in enumerate(DETAIL_KINDS)}
    coords = np.arange(s, dtype=f32) - (s - 1) / 2
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    # Nuisance draws come first and always in the same order, whatever the kinds.
    shift = rng.uniform(-0.12, 0.12, size=(n, 2)) * s
    radius = rng.uniform(0.27, 0.36, size=n) * s
    angle_noise = rng.uniform(-1, 1, size=n)
    period_noise = rng.uniform(-1, 1, size=n)
    value_noise = rng.uniform(-1, 1, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    ring_rot = rng.uniform(0, 2 * np.pi, size=n)
    free_angle = rng.uniform(0, np.pi, size=n)
    gain = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)) * rng.uniform(0.985, 1.015, size=(n, 1, 1, 3))
    # Uniform pixel noise of std cfg.noise: several times cheaper to draw than Gaussian noise.
    noise = rng.random(size=(n, s, s, 3), dtype=f32)
    noise -= 0.5
    noise *= f32(cfg.noise * np.sqrt(12.0))

    x = xx[None] - shift[:, 0, None, None].astype(f32)
    y = yy[None] - shift[:, 1, None, None].astype(f32)
    r = radius.astype(f32)[:, None, None]

    # Shape, stretched for aspect groups (class value x at most +-15% of a step of jitter).
    aspect = np.where(is_["aspect"], value * np.exp(0.01 * cfg.detail * value_noise), 1.0)
    sq = np.sqrt(aspect).astype(f32)[:, None, None]
    mask = _shape_mask(c["shape"], x / sq, y * sq, r)
    if is_["hole"].any():
        hole_r = np.where(is_["hole"], (value + 0.004 * cfg.detail * value_noise) * radius, -2.0)
        dist = np.sqrt(x**2 + y**2)
        mask *= np.clip(dist - hole_r.astype(f32)[:, None, None] + 0.5, 0.0, 1.0)

    # Stripe texture: class-defining orientation or period in orient / freq groups, random else.
    theta = np.where(is_["orient"], value + angle_noise * np.pi / (6 * n_in), free_angle)
    base_period = max(3.0, s / 6.5)
    period = base_period * np.exp(0.25 * period_noise)  # nuisance: +-25%
    freq_step = np.log1p(0.3 * cfg.detail)
    period = np.where(
        is_["freq"], base_period * value * np.exp(0.2 * freq_step * period_noise), period
    )
    th = theta.astype(f32)[:, None, None]
    proj = x * np.cos(th) + y * np.sin(th)
    stripes = 0.5 + 0.5 * np.cos(
        2 * np.pi * proj / period.astype(f32)[:, None, None] + phase.astype(f32)[:, None, None]
    )
    # Where the stripes do not define the class they are a fainter distraction.
    amp = np.select([is_["orient"], is_["freq"]], [1.0, 1.6], 0.5) * cfg.stripe_contrast
    amp = amp.astype(f32)[:, None, None]
    texture = (1.0 - amp) + amp * stripes
    fine = np.flatnonzero(is_["fine"])
    if len(fine):  # the resolution family's grating (phase from ring_rot: no extra draws)
        tf = (value[fine] + angle_noise[fine] * np.pi / (6 * n_in[fine])).astype(f32)
        tf = tf[:, None, None]
        pf = x[fine] * np.cos(tf) + y[fine] * np.sin(tf)
        grating = 0.5 + 0.5 * np.cos(
            2 * np.pi * pf * f32(cfg.fine_cycles / s) + ring_rot[fine].astype(f32)[:, None, None]
        )
        texture[fine] *= (1.0 - FINE_CONTRAST) + FINE_CONTRAST * grating
    img = mask[..., None] * (c["fg"][:, None, None, :] * texture[..., None])
    img += (1 - mask[..., None]) * c["bg"][:, None, None, :]

    # Light dots, visible on shape and background alike: one at a class-defined angle (dot), or
    # 1..m on a randomly rotated ring (count).
    marked = np.flatnonzero(is_["dot"] | is_["count"])
    if len(marked):
        ink = _dots(cfg, c, marked, x, y, radius, ring_rot, value_noise)[..., None]
        img[marked] = img[marked] * (1 - ink) + ink * np.float32(0.95)

    img *= gain.astype(f32)
    img += noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _dots(cfg, c, idx, x, y, radius, ring_rot, value_noise) -> np.ndarray:
    """Ink map (len(idx), H, W) of the dot / count groups' light marks."""
    kind, value, n_in = c["kind"][idx], c["value"][idx], c["n_in"][idx]
    is_dot = kind == DETAIL_KINDS.index("dot")
    n_dots = np.where(is_dot, 1, value).astype(int)
    slots = int(n_dots.max())
    j = np.arange(slots)[None, :]
    ang = np.where(
        is_dot[:, None],
        value[:, None] + value_noise[idx, None] * np.pi / (5 * n_in[:, None]),
        ring_rot[idx, None] + 2 * np.pi * j / n_dots[:, None],
    )
    r = radius[idx, None]
    dist_c = np.where(is_dot[:, None], 0.58, 0.5) * r
    cx = (dist_c * np.cos(ang)).astype(np.float32)[:, :, None, None]
    cy = (dist_c * np.sin(ang)).astype(np.float32)[:, :, None, None]
    dot_r = np.where(is_dot, 0.13, 0.13)[:, None] * r
    dot_r = np.maximum(0.9, dot_r).astype(np.float32)[:, :, None, None]
    d = np.sqrt((x[idx, None] - cx) ** 2 + (y[idx, None] - cy) ** 2)
    on = (j < n_dots[:, None]).astype(np.float32)[:, :, None, None]
    ink = (np.clip(dot_r - d + 0.5, 0.0, 1.0) * on).max(axis=1)
    strength = np.where(is_dot, 0.55, 0.6)[:, None, None] * cfg.detail
    return np.minimum(0.9, strength) * ink

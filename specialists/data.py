"""What a data source gives: train/val/test splits in memory, class names, known coarse groups.

A source is named by a :class:`DataSource` (parsed from a string such as ``embedded:n_classes=40``
or ``folder:PATH``, see :mod:`specialists.sources`) and resolves to a :class:`DataBundle`: uint8
arrays (N, H, W, C) per split, the class names, and the coarse groups where the data has them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import SpecialistsError

__all__ = ["ArraySplit", "DataBundle", "DataSource", "carve_val", "stratified_split"]


@dataclass(frozen=True)
class DataSource:
    """Where the data comes from, JSON-serialisable so a run can reload exactly the same data."""

    kind: str = "embedded"
    path: str | None = None
    options: dict = field(default_factory=dict)
    seed: int = 0
    val_fraction: float = 0.1
    image_size: int | None = None  # folder sources: size images are decoded to (default 64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataSource:
        return cls(**d)

    def describe(self) -> str:
        if self.kind == "embedded":
            opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            return "embedded" + (f":{opts}" if opts else "")
        opts = "".join(f",{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.path}{opts}"


@dataclass
class ArraySplit:
    """One split in memory: ``images`` (N, H, W, C) uint8 and ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ArraySplit:
        return ArraySplit(self.images[index], self.labels[index])


@dataclass
class DataBundle:
    source: DataSource
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    class_names: list[str]
    coarse: np.ndarray | None = None  # (K,) coarse group id of every class, when known
    coarse_names: list[str] | None = None
    hflip: bool = False  # whether a horizontal flip preserves the class

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    def split(self, name: str) -> ArraySplit:
        if name not in ("train", "val", "test"):
            raise SpecialistsError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (a seeded sample)."""
        imgs = self.train.images
        rng = np.random.default_rng(0)
        sample = imgs[rng.choice(len(imgs), size=min(len(imgs), 5000), replace=False)]
        x = sample.reshape(-1, imgs.shape[-1]).astype(np.float64) / 255.0
        std = np.maximum(x.std(0), 1e-3)
        return x.mean(0).round(6).tolist(), std.round(6).tolist()


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, carved): ``fraction`` of every class carved out, at least one per class
    when the class has two or more examples."""
    rng = np.random.default_rng([seed, 4242])
    keep, carved = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(fraction * len(idx)))
        n = min(max(n, 1 if len(idx) >= 2 else 0), len(idx) - 1) if fraction > 0 else 0
        carved.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(carved))


def carve_val(train: ArraySplit, source: DataSource) -> tuple[ArraySplit, ArraySplit]:
    keep, val = stratified_split(train.labels, source.val_fraction, source.seed)
    if len(val) == 0:
        raise SpecialistsError(
            f"{source.describe()}: too few training images to carve a validation split"
        )
    return train.subset(keep), train.subset(val)

"""What a data source gives: train/val/test splits in memory, class names, known coarse groups.

A source is named by a :class:`DataSource` (parsed from a string such as ``embedded:n_classes=40``
or ``folder:PATH``, see :mod:`specialists.sources`) and resolves to a :class:`DataBundle`: uint8
arrays (N, H, W, C) per split, the class names, and the coarse groups where the data has them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import SpecialistsError

__all__ = [
    "ArraySplit",
    "DataBundle",
    "DataSource",
    "carve_val",
    "accuracy_gap_warning",
    "group_split",
    "nearest_similarity",
    "split_warning",
    "stratified_split",
]


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
        if self.kind == "dataset":
            return f"dataset:{self.options.get('name', 'python')}"
        if self.kind == "embedded":
            opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
            return "embedded" + (f":{opts}" if opts else "")
        opts = "".join(f",{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kind}:{self.path}{opts}"


@dataclass
class ArraySplit:
    """One split in memory: ``images`` (N, H, W, C) uint8 and ``labels`` (N,) int64, and where
    the source has them, ``groups`` (N,): the source of each image (a video, a writer, a
    product) that a group-aware split keeps on one side."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ArraySplit:
        groups = None if self.groups is None else self.groups[index]
        return ArraySplit(self.images[index], self.labels[index], groups)


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
        pick = rng.choice(len(imgs), size=min(len(imgs), 5000), replace=False)
        c = imgs.shape[-1]
        total, total_sq, count = np.zeros(c), np.zeros(c), 0
        for start in range(0, len(pick), 256):  # in chunks: 5,000 images at 224 px are 6 GB
            x = imgs[np.sort(pick[start : start + 256])].reshape(-1, c).astype(np.float64) / 255.0
            total += x.sum(0)
            total_sq += (x * x).sum(0)
            count += len(x)
        mean = total / count
        std = np.maximum(np.sqrt(np.maximum(total_sq / count - mean * mean, 0)), 1e-3)
        return mean.round(6).tolist(), std.round(6).tolist()


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


def group_split(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, carved) with every group wholly on one side: the first fold of
    scikit-learn's ``StratifiedGroupKFold`` with about 1 / ``fraction`` folds (shuffled,
    seeded), which keeps the classes' shares close to the data's."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    folds = min(max(2, round(1 / fraction)), n_groups)
    if folds < 2:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    with warnings.catch_warnings():  # "the least populated class has only N members"
        warnings.simplefilter("ignore", UserWarning)
        keep, carved = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.sort(keep), np.sort(carved)


def carve_val(train: ArraySplit, source: DataSource, *, indices: bool = False):
    """The validation split carved from training: stratified by class and seeded, or, when the
    images have groups (``train.groups``), with every group wholly on one side. With
    ``indices``, the (keep, val) index arrays instead of the two splits."""
    if train.groups is not None:
        keep, val = group_split(train.labels, train.groups, source.val_fraction, source.seed)
    else:
        keep, val = stratified_split(train.labels, source.val_fraction, source.seed)
    if len(val) == 0:
        raise SpecialistsError(
            f"{source.describe()}: too few training images{' groups' if train.groups is not None else ''} "
            "to carve a validation split"
        )
    if indices:
        return keep, val
    return train.subset(keep), train.subset(val)


def _thumbnails(images: np.ndarray, index: np.ndarray, size: int = 16) -> np.ndarray:
    """A cheap embedding of ``images[index]``: grayscale, ``size`` x ``size`` (area means),
    centred, unit length. Gathered in chunks: a memory-mapped set is never copied whole."""
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(index), 4096):  # bounded memory, whatever the image size
        chunk = np.ascontiguousarray(images[index[start : start + 4096]])
        x = torch.from_numpy(chunk).float().mean(-1)[:, None]
        t = F.adaptive_avg_pool2d(x, size).flatten(1)
        t -= t.mean(1, keepdim=True)
        out.append(t / t.norm(dim=1, keepdim=True).clamp_min(1e-6))
    return torch.cat(out).numpy() if out else np.zeros((0, size * size), dtype=np.float32)


MAX_REFERENCE = 100_000  # training images searched for a validation image's nearest neighbour


def nearest_similarity(
    reference: np.ndarray, images: np.ndarray, *, sample: int = 1000, seed: int = 0
) -> np.ndarray:
    """For (a seeded sample of at most ``sample`` of) ``images``: the cosine similarity of its
    thumbnail to the nearest thumbnail among at most ``MAX_REFERENCE`` ``reference`` images
    (a seeded sample beyond that)."""
    import torch

    rng = np.random.default_rng([seed, 99])
    pick = rng.choice(len(images), size=min(sample, len(images)), replace=False)
    ref = rng.choice(len(reference), size=min(MAX_REFERENCE, len(reference)), replace=False)
    q = torch.from_numpy(_thumbnails(images, np.sort(pick)))
    r = torch.from_numpy(_thumbnails(reference, np.sort(ref)))
    return torch.cat([(q[i : i + 256] @ r.T).max(1).values for i in range(0, len(q), 256)]).numpy()


def split_warning(bundle: DataBundle) -> str | None:
    """One line when validation looks like a copy of training. The test split is the yardstick:
    its images come from elsewhere, so validation images should lie as far from their nearest
    training image (``nearest_similarity``) as test images do. When validation is carved from
    the same videos, writers or products, most validation images lie closer than 90% of the
    test images; the warning fires when at least half of them do (about 10% without leakage;
    with more than ``MAX_REFERENCE`` training images, only the searched share r of them can be
    found, and the bar is 0.1 + 0.4 r)."""
    if min(len(bundle.val), len(bundle.test), len(bundle.train)) == 0:
        return None
    val = 1 - nearest_similarity(bundle.train.images, bundle.val.images)
    test = 1 - nearest_similarity(bundle.train.images, bundle.test.images)
    closer = float((val < np.quantile(test, 0.1)).mean())
    searched = min(1.0, MAX_REFERENCE / len(bundle.train))
    if closer < 0.1 + 0.4 * searched:
        return None
    fix = (
        "give the images a group key (folder:PATH,group=REGEX on the file name, or "
        "group_csv=FILE) so that each source stays on one side, or a val/ folder"
        if bundle.source.kind == "folder"
        else "carve validation by source (writer, video, product) instead of at random"
    )
    return (
        f"{bundle.source.describe()}: {100 * closer:.0f}% of the validation images are closer to a "
        "training image than 90% of the test images are (about 10% is expected): validation looks "
        f"like a copy of training and will flatter every model and every choice made on it; {fix}"
    )


def accuracy_gap_warning(val_acc: float, n_val: int, test_acc: float, n_test: int) -> str | None:
    """One line when a model's validation accuracy is far above its test accuracy: validation
    error below half the test error and the gap beyond 4 standard errors (a two-proportion
    z-test), the mark of validation images that are near-copies of training images."""
    if n_val == 0 or n_test == 0:
        return None
    ev, et = 1 - val_acc, 1 - test_acc
    pooled = (ev * n_val + et * n_test) / (n_val + n_test)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n_val + 1 / n_test))
    z = (et - ev) / se
    if ev >= 0.5 * et or z < 4:
        return None
    return (
        f"validation accuracy {100 * val_acc:.2f}% is far above test accuracy {100 * test_acc:.2f}% "
        f"(z = {z:.1f}): validation images are likely near-copies of training images (frames of one "
        "video, drawings of one writer), so every choice made on validation is flattered; split "
        "validation by source (folder:PATH,group=REGEX or group_csv=FILE)"
    )

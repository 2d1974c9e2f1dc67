"""Data given in Python: ``torch.utils.data.Dataset`` objects (or anything indexable that returns
``(image, label)``), and the data a run keeps of them.

``bundle_from_datasets(train, test)`` reads the datasets once into arrays and returns a
:class:`~specialists.data.DataBundle` whose source is of kind ``dataset``: a name and a
fingerprint of the arrays. Such a source cannot be read again from anywhere, so the generalist
writes all three splits into its run's cache (``RUN/cache/``), and every later step reads them
there (:func:`load_run_data`): the specialists, the calibration and the evaluation see exactly
the data the generalist saw, never the default source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import ArraySplit, DataBundle, DataSource, carve_val
from .errors import SpecialistsError
from .records import GeneralistRecord
from .run import RunDir
from .sources import load_data

__all__ = ["DATASET", "bundle_from_datasets", "load_run_data"]

DATASET = "dataset"  # the DataSource kind of data given in Python


def _image(item: Any, where: str) -> np.ndarray:
    """One image as uint8 (H, W, C): a PIL image, an (H, W[, C]) array of uint8 (or floats in
    [0, 1]), or a (C, H, W) tensor as torchvision's ToTensor makes."""
    try:
        import torch

        if isinstance(item, torch.Tensor):
            t = item.detach().cpu()
            if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
                t = t.permute(1, 2, 0)
            item = t.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
        item = np.asarray(item.convert("L" if item.mode in ("1", "L", "I", "F") else "RGB"))
    if not isinstance(item, np.ndarray):
        raise SpecialistsError(
            f"{where}: the image is a {type(item).__name__}; expected a PIL image, a numpy array "
            "or a tensor"
        )
    if item.ndim == 2:
        item = item[..., None]
    if item.ndim != 3 or item.shape[-1] not in (1, 3):
        raise SpecialistsError(
            f"{where}: image of shape {item.shape}; expected (H, W), (H, W, C) or (C, H, W) "
            "with 1 or 3 channels"
        )
    if item.dtype == np.uint8:
        return item
    if np.issubdtype(item.dtype, np.floating):
        if item.size and (item.min() < 0 or item.max() > 1):
            raise SpecialistsError(
                f"{where}: float image with values outside [0, 1] (normalised already? give the "
                "images before normalisation: the run computes its own mean and std)"
            )
        return np.round(item * 255).astype(np.uint8)
    raise SpecialistsError(f"{where}: image of dtype {item.dtype}; expected uint8 or float")


def _label(value: Any, where: str) -> int:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SpecialistsError(f"{where}: the label is {value!r}; expected an integer class index")
    return int(value)


def _read(dataset: Any, what: str) -> ArraySplit:
    """Every ``(image, label)`` of ``dataset`` as arrays, checked item by item."""
    try:
        n = len(dataset)
    except TypeError as e:
        raise SpecialistsError(
            f"the {what} dataset has no len(); expected a map-style Dataset"
        ) from e
    if n == 0:
        raise SpecialistsError(f"the {what} dataset is empty")
    images: np.ndarray | None = None
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        where = f"{what} dataset item {i}"
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise SpecialistsError(
                f"{where}: expected a pair (image, label), got {type(item).__name__}"
            )
        img = _image(item[0], where)
        if images is None:
            images = np.empty((n, *img.shape), dtype=np.uint8)
        elif img.shape != images.shape[1:]:
            raise SpecialistsError(
                f"{where}: image of shape {img.shape}, item 0's was {images.shape[1:]}; give the "
                "dataset a transform that makes every image the same size"
            )
        images[i] = img
        labels[i] = _label(item[1], where)
    assert images is not None
    if images.shape[1] != images.shape[2]:
        raise SpecialistsError(
            f"the {what} dataset's images are {images.shape[1]}x{images.shape[2]}; make them "
            "square (a resize and centre crop)"
        )
    return ArraySplit(images, labels)


def bundle_from_datasets(
    train: Any,
    test: Any,
    *,
    val: Any | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "python",
    val_fraction: float = 0.1,
    seed: int = 0,
    hflip: bool = False,
) -> DataBundle:
    """A :class:`DataBundle` from datasets returning ``(image, label)`` (images as PIL, numpy
    uint8 (H, W[, C]) or floats in [0, 1], or (C, H, W) tensors; all of one square size).
    Without ``val``, a stratified, seeded share ``val_fraction`` of ``train`` is carved out.
    Class names: ``class_names``, else the train dataset's ``classes`` (torchvision's
    convention), else ``class0``, ``class1``, ..."""
    tr, te = _read(train, "train"), _read(test, "test")
    va = None if val is None else _read(val, "val")
    for split, s in (("test", te), ("val", va)):
        if s is not None and s.images.shape[1:] != tr.images.shape[1:]:
            raise SpecialistsError(
                f"the {split} dataset's images are {s.images.shape[1:]}, the train dataset's "
                f"{tr.images.shape[1:]}"
            )
    n_classes = (
        int(max(tr.labels.max(), te.labels.max(), -1 if va is None else va.labels.max())) + 1
    )
    names = list(class_names or getattr(train, "classes", None) or [])
    if not names:
        names = [f"class{c}" for c in range(n_classes)]
    if len(names) < n_classes or min(tr.labels.min(), te.labels.min()) < 0:
        raise SpecialistsError(
            f"labels run from {min(tr.labels.min(), te.labels.min())} to {n_classes - 1} but there "
            f"are {len(names)} class names; labels must be 0..{len(names) - 1}"
        )
    digest = hashlib.sha256()
    for s in (tr, te, va):
        if s is not None:
            digest.update(np.ascontiguousarray(s.images).data)
            digest.update(s.labels.data)
    source = DataSource(
        DATASET,
        None,
        {"name": name, "sha256": digest.hexdigest()[:16]},
        seed,
        val_fraction,
        int(tr.images.shape[1]),
    )
    if va is None:
        tr, va = carve_val(tr, source)
    return DataBundle(source, tr, va, te, names, hflip=hflip)


def load_run_data(
    run: RunDir, record: GeneralistRecord, *, min_size: int | None = None
) -> DataBundle:
    """The data of a run's generalist: read again from its source, or, for data given in Python
    (kind ``dataset``), from the run's cache, where the generalist wrote all three splits."""
    source = DataSource.from_dict(record.data)
    if source.kind != DATASET:
        return load_data(source, min_size=min_size)
    stored = source.image_size
    if min_size is not None and stored is not None and min_size > stored:
        raise SpecialistsError(
            f"{run.root}: its data were given in Python at {stored} px; a model at {min_size} px "
            "needs a source that can be read again at that size (a folder, Omniglot, ...)"
        )
    splits = {}
    for split in ("train", "val", "test"):
        images, labels = run.cache_images(split), run.cache_labels(split)
        if not labels.is_file():
            raise SpecialistsError(
                f"{labels}: missing; data given in Python live only in the run's cache "
                "(train the generalist again with the same datasets)"
            )
        splits[split] = ArraySplit(
            np.load(images, mmap_mode="r", allow_pickle=False),
            np.load(labels, allow_pickle=False),
        )
    return DataBundle(
        source,
        splits["train"],
        splits["val"],
        splits["test"],
        list(record.class_names),
        hflip=record.hflip,
    )

"""What every training job shares: the data cache, the set-up from a run directory, the write-out.

A job (a specialist, a control's fine-tuned copy) runs in a worker process that knows only the run
directory: it memory-maps the data arrays cached there, rebuilds the generalist, and ends by
writing its weights and then its record, which marks it complete.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from specialists._version import software_versions
from specialists.artifacts import load_generalist
from specialists.data import DataBundle, DataSource
from specialists.datasets import load_run_data
from specialists.errors import SpecialistsError
from specialists.models import resolve_device, set_cpu_threads
from specialists.records import GeneralistRecord, Record
from specialists.run import ArtifactPaths, RunDir
from specialists.storage import file_sha256, load_npy, save_json, save_npy, save_tensors
from specialists.transforms import BatchTransform, make_transforms

__all__ = [
    "JobContext",
    "cache_data",
    "cache_sizes",
    "load_cached",
    "own_size",
    "save_artifact",
    "start_job",
]

R = TypeVar("R", bound=Record)

log = logging.getLogger(__name__)


def cache_data(
    run: RunDir, bundle: DataBundle, size: int | None = None, splits=("train", "val")
) -> None:
    """Write the train and val arrays once, so parallel jobs memory-map them instead of reloading
    (``size``: the arrays made at that size for specialists with their own input size; data
    given in Python also keep their test split here, for nothing else can read them again)."""
    for split in splits:
        s = bundle.split(split)
        if not run.cache_labels(split, size).is_file():
            save_npy(run.cache_images(split, size), s.images)
            save_npy(run.cache_labels(split, size), s.labels)  # labels last: marks it complete


def base_size(run: RunDir) -> int:
    """The side of the images in the run's own cache (the data's stored size)."""
    return int(np.load(run.cache_images("train"), mmap_mode="r", allow_pickle=False).shape[1])


def cache_sizes(run: RunDir, record: GeneralistRecord, sizes: list[int | None] = ()) -> None:
    """Cache the run's data for the workers: at the data's own size, and made again from the
    originals at every size in ``sizes`` above it that is not the generalist's own (None stands
    for the generalist's). Each is checked to hold the same labels in the same order; the
    embedded data's nuisance draws differ between sizes, so its images are other renderings of
    the same classes."""
    source = DataSource.from_dict(record.data)
    if not run.cache_labels("val").is_file():
        log.info("caching the data arrays for the workers")
        cache_data(run, load_run_data(run, record))
    base = base_size(run)
    for size in sorted({int(s) for s in sizes if own_size(s, record) and s > base}):
        if run.cache_labels("val", size).is_file():
            continue
        log.info("making the data at %d px from the originals", size)
        bundle = load_run_data(run, record, min_size=size)
        for split in ("train", "val"):
            if not np.array_equal(bundle.split(split).labels, load_npy(run.cache_labels(split))):
                raise SpecialistsError(
                    f"{source.describe()}: the {split} split at {size} px does not hold the same "
                    "labels as at the data's own size"
                )
        cache_data(run, bundle, size)


def mapped_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a (read-only, memory-mapped) array, sharing its memory: every worker reads
    the same cached pages instead of holding its own copy of the data. Never written to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def own_size(size: int | None, record: GeneralistRecord) -> int | None:
    """``size`` when a model has its own input size, None when it is the generalist's (its
    images are the data's own, as the generalist's were)."""
    return None if size is None or size == record.input_size else int(size)


def load_cached(run: RunDir, split: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images memory-mapped read-only, labels) of a cached split: the data's own when ``size``
    is None or not above them, else the cache made at exactly ``size`` pixels."""
    at = None if size is None or size <= base_size(run) else size
    if at is not None and not run.cache_labels(split, at).is_file():
        raise SpecialistsError(
            f"{run.cache_dir(at)}: no data cached at {at} px (`specialists train` makes it)"
        )
    labels = load_npy(run.cache_labels(split, at))
    images = np.load(run.cache_images(split, at), mmap_mode="r", allow_pickle=False)
    return images, labels


@dataclass
class JobContext:
    """A job's view of its run: device, generalist, cached data and the generalist's transforms."""

    run: RunDir
    device: torch.device
    generalist: nn.Module
    record: GeneralistRecord
    train_images: np.ndarray  # (N, H, W, C) uint8, memory-mapped
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    train_transform: BatchTransform
    eval_transform: BatchTransform
    started: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def start_job(
    run_root: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    input_size: int | None = None,
) -> JobContext:
    """Set a job up from its run directory (``threads``: CPU threads when on the CPU;
    ``input_size``: the job's model needs images at least that large)."""
    started = time.perf_counter()
    run = RunDir.of(run_root)
    dev = resolve_device(device)
    if dev.type == "cpu":
        set_cpu_threads(threads)
    generalist, record = load_generalist(run, dev)
    train_images, train_labels = load_cached(run, "train", input_size)
    val_images, val_labels = load_cached(run, "val", input_size)
    train_tf, eval_tf = make_transforms(record)
    return JobContext(
        run,
        dev,
        generalist,
        record,
        train_images,
        train_labels,
        val_images,
        val_labels,
        train_tf,
        eval_tf,
        started,
    )


def save_artifact(
    files: ArtifactPaths,
    model: nn.Module,
    *,
    metadata: dict,
    make_record: Callable[[str], R],
) -> R:
    """Write ``model``'s weights, then the record ``make_record(weights_sha256)`` that marks the
    artifact complete; returns the record."""
    save_tensors(files.weights, model.state_dict(), metadata)
    record = replace(make_record(file_sha256(files.weights)), versions=software_versions())
    save_json(files.record, record.to_dict())
    return record

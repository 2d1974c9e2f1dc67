"""Training one specialist: enriched batches, dustbin labels, optional soft targets, early stopping.

``train_specialist`` is one independent job: it reads paths (the run's generalist, the cached data
arrays) and writes its own artifact (weights, then the JSON record that marks it complete) into
``RUN/specialists/``. The launchers run many of these in parallel.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn

from specialists.errors import SpecialistsError
from specialists.io import file_sha256, load_npy, save_json, save_npy, save_tensors
from specialists.models import get_classifier, resolve_device, set_cpu_threads
from specialists.run import RunDir
from specialists.specialist import (
    SpecialistRecord,
    build_specialist,
    group_hash,
    prior_offsets,
    project_to_group,
)

from ._faults import maybe_die
from .data import DataBundle
from .generalist import load_generalist, make_transforms
from .loop import build_optimizer, cosine_with_warmup, predict_proba, train_one_epoch

__all__ = ["EnrichedBatchSampler", "SpecialistConfig", "cache_data", "train_specialist"]

log = logging.getLogger(__name__)


@dataclass
class SpecialistConfig:
    """How every specialist of a run is trained (written into each specialist's record)."""

    enrich_fraction: float = 0.5  # share of every batch drawn from the group
    # `epochs` epochs of a cosine schedule, keeping the epoch with the best validation score.
    # An epoch is `examples_per_epoch` examples, not a pass over the data.
    epochs: int = 12
    # Default epoch: the group's training examples / enrich_fraction (one pass over the group),
    # but at least `min_steps_per_epoch` batches, so a small group still gets enough updates
    # between validations for early stopping to choose from.
    examples_per_epoch: int | None = None
    min_steps_per_epoch: int = 25
    # Stop after `patience` epochs without a better validation score. Off by default: stopping
    # while the cosine schedule's learning rate is still high leaves the specialist unsettled
    # (measured on Fashion-MNIST: below the generalist inside its group); the best epoch is kept.
    patience: int | None = None
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    soft_weight: float = (
        0.0  # weight a of the generalist's soft targets (DESIGN §1b: off by default)
    )
    temperature: float = 3.0
    trainable: str = "all"  # all | last (the last stage and the head) | head
    head_init: str = "random"  # random | copy (DESIGN §1b and the demo measured random ahead)
    correction: str = "gated"  # gated | natural | none
    seed: int = 0
    amp: str = "auto"

    def __post_init__(self) -> None:
        if not 0 < self.enrich_fraction < 1:
            raise ValueError(f"enrich_fraction must be in (0, 1), got {self.enrich_fraction}")
        if self.trainable not in ("all", "last", "head"):
            raise ValueError(f"trainable must be all, last or head, got {self.trainable!r}")
        if self.correction not in ("gated", "natural", "none"):
            raise ValueError(f"correction must be gated, natural or none, got {self.correction!r}")
        if not 0 <= self.soft_weight <= 1:
            raise ValueError(f"soft_weight must be in [0, 1], got {self.soft_weight}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")


class EnrichedBatchSampler:
    """Batches with ``round(fraction * batch_size)`` examples from the group and the rest from the
    other classes, each side drawn by walking seeded permutations (so it covers the data evenly).
    ``labels_for(idx)`` maps dataset labels to the specialist's: 0..|S|-1 in sorted class order,
    |S| for the dustbin."""

    def __init__(
        self,
        labels: np.ndarray,
        classes: list[int],
        n_classes: int,
        batch_size: int,
        fraction: float,
        seed: int = 0,
    ) -> None:
        self.classes = sorted(int(c) for c in classes)
        self.lut = np.full(n_classes, len(self.classes), dtype=np.int64)
        self.lut[self.classes] = np.arange(len(self.classes))
        inside = self.lut[labels] < len(self.classes)
        self.inside, self.outside = np.flatnonzero(inside), np.flatnonzero(~inside)
        if len(self.inside) == 0:
            raise SpecialistsError(f"group {self.classes[:5]}...: no training examples")
        self.batch_size = batch_size
        self.n_in = (
            min(batch_size, max(1, round(fraction * batch_size)))
            if len(self.outside)
            else batch_size
        )
        self.rng = np.random.default_rng([seed, 777])
        self._streams = {"in": (self.inside, iter(())), "out": (self.outside, iter(()))}

    def _take(self, side: str, n: int) -> np.ndarray:
        pool, it = self._streams[side]
        out = []
        while len(out) < n:
            try:
                out.append(next(it))
            except StopIteration:
                it = iter(pool[self.rng.permutation(len(pool))])
        self._streams[side] = (pool, it)
        return np.asarray(out, dtype=np.int64)

    def batches(self, n_examples: int) -> list[np.ndarray]:
        n_batches = max(1, math.ceil(n_examples / self.batch_size))
        out = []
        for _ in range(n_batches):
            idx = np.concatenate(
                [self._take("in", self.n_in), self._take("out", self.batch_size - self.n_in)]
            )
            out.append(idx[self.rng.permutation(len(idx))])
        return out

    def labels_for(self, dataset_labels: np.ndarray) -> np.ndarray:
        return self.lut[dataset_labels]


def cache_data(run: RunDir, bundle: DataBundle) -> None:
    """Write the train and val arrays once, so parallel jobs memory-map them instead of reloading."""
    cache = run.root / "cache"
    for split in ("train", "val"):
        s = bundle.split(split)
        if not (cache / f"{split}_labels.npy").is_file():
            save_npy(cache / f"{split}_images.npy", s.images)
            save_npy(
                cache / f"{split}_labels.npy", s.labels
            )  # labels last: marks the split complete


def _load_cached(run: RunDir, split: str) -> tuple[np.ndarray, np.ndarray]:
    cache = run.root / "cache"
    labels = load_npy(cache / f"{split}_labels.npy")
    images = np.load(cache / f"{split}_images.npy", mmap_mode="r", allow_pickle=False)
    return images, labels


def _set_trainable(model: nn.Module, trainable: str) -> None:
    """all: everything; head: the classifier only; last: the last stage group and the head."""
    if trainable == "all":
        return
    head = get_classifier(model)
    keep = {id(p) for p in head.parameters()}
    if trainable == "last":
        groups = group_parameters(model, model.group_matcher(coarse=True))
        names = dict(model.named_parameters())
        for gid in sorted(groups)[-2:]:
            keep |= {id(names[n]) for n in groups[gid] if n in names}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def train_specialist(
    run_dir: str | Path,
    spec_id: int,
    classes: list[int],
    cfg: SpecialistConfig,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    out_dir: str | Path | None = None,
) -> SpecialistRecord:
    """Train specialist ``spec_id`` for ``classes`` and write ``NNN.{safetensors,json}`` into
    ``out_dir`` (default ``RUN/specialists``)."""
    t0 = time.perf_counter()
    run = RunDir.of(run_dir)
    dev = resolve_device(device)
    if dev.type == "cpu":
        set_cpu_threads(threads)
    generalist, grec = load_generalist(run.root, dev)
    classes = sorted(int(c) for c in classes)
    if not classes or min(classes) < 0 or max(classes) >= grec.n_classes:
        raise SpecialistsError(
            f"specialist {spec_id}: classes out of range for {grec.n_classes} classes"
        )
    train_images, train_labels = _load_cached(run, "train")
    val_images, val_labels = _load_cached(run, "val")
    train_tf, eval_tf = make_transforms(grec)
    train_tf.augment = True
    images_t = torch.from_numpy(np.array(train_images))  # a private in-memory copy of the map

    torch.manual_seed(cfg.seed + spec_id)
    sampler = EnrichedBatchSampler(
        train_labels,
        classes,
        grec.n_classes,
        cfg.batch_size,
        cfg.enrich_fraction,
        seed=cfg.seed + 1000 * spec_id,
    )
    rng = np.random.default_rng([cfg.seed, spec_id, 1])
    sample_idx = rng.choice(len(train_labels), size=min(512, len(train_labels)), replace=False)
    sample = eval_tf(images_t[torch.from_numpy(np.sort(sample_idx))].to(dev))
    model = build_specialist(
        generalist, classes, sample, cfg.head_init, seed=cfg.seed + spec_id
    ).to(dev)
    _set_trainable(model, cfg.trainable)

    examples = cfg.examples_per_epoch or max(
        math.ceil(len(sampler.inside) / cfg.enrich_fraction),
        cfg.min_steps_per_epoch * cfg.batch_size,
    )
    steps = max(1, math.ceil(examples / cfg.batch_size))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, int(cfg.warmup_epochs * steps), cfg.epochs * steps)
    local_labels = torch.from_numpy(sampler.labels_for(train_labels))
    cls_t = torch.as_tensor(classes, device=dev)
    T, a = cfg.temperature, cfg.soft_weight

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits, y)
        if a == 0:
            return hard
        with torch.no_grad():
            teacher = project_to_group(torch.softmax(generalist(x).float() / T, 1), cls_t)
        soft = F.kl_div(F.log_softmax(logits / T, 1), teacher, reduction="batchmean") * T * T
        return (1 - a) * hard + a * soft

    # Validation: every in-group example plus as many others (at least 1), for a balanced view.
    val_local = sampler.labels_for(val_labels)
    val_in = np.flatnonzero(val_local < len(classes))
    val_out_all = np.flatnonzero(val_local == len(classes))
    val_out = (
        np.sort(
            rng.choice(val_out_all, size=min(len(val_out_all), max(len(val_in), 1)), replace=False)
        )
        if len(val_out_all)
        else val_out_all
    )
    val_idx = np.concatenate([val_in, val_out])
    val_x = torch.from_numpy(np.array(val_images[val_idx]))

    def validate() -> tuple[float, np.ndarray]:
        p = predict_proba(model, val_x, eval_tf, dev, 512, cfg.amp)
        pred = p.argmax(1)
        acc_in = float((pred[: len(val_in)] == val_local[val_in]).mean()) if len(val_in) else 0.0
        acc_out = float((pred[len(val_in) :] == len(classes)).mean()) if len(val_out) else 1.0
        return cfg.enrich_fraction * acc_in + (1 - cfg.enrich_fraction) * acc_out, p

    history: list[dict] = []
    best_score, best_epoch, best_state = -1.0, 0, None
    gen = torch.Generator().manual_seed(cfg.seed + spec_id)
    seen = 0
    for epoch in range(cfg.epochs):
        if cfg.patience is not None and best_epoch and epoch - best_epoch >= cfg.patience:
            break
        stats = train_one_epoch(
            model,
            images_t,
            sampler.batches(examples),
            lambda idx: local_labels[torch.from_numpy(idx)],
            train_tf,
            optimizer,
            scheduler,
            loss_fn,
            dev,
            cfg.amp,
            gen,
            desc=f"specialist {spec_id} epoch {epoch + 1}",
            progress=progress,
        )
        maybe_die("specialist", spec_id, epoch + 1)
        seen += steps * cfg.batch_size
        score, _ = validate()
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(stats["train_loss"], 5),
                "train_acc": round(stats["train_acc"], 5),
                "val_balanced_acc": round(score, 5),
            }
        )
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)

    # Priors for the dustbin correction, and in-group accuracy against the generalist's.
    natural = float(np.isin(train_labels, classes).mean())
    gval = load_npy(run.val_probs)
    gated_mask = np.isin(gval.argmax(1), classes)
    gated = float(np.isin(val_labels[gated_mask], classes).mean()) if gated_mask.any() else natural
    target = {"natural": natural, "gated": gated, "none": cfg.enrich_fraction}[cfg.correction]
    offsets = prior_offsets(target, cfg.enrich_fraction, len(classes))
    _, p_val = validate()
    in_pred = p_val[: len(val_in), : len(classes)].argmax(1)
    g_in = gval[val_in][:, classes].argmax(1)
    metrics = {
        "val_balanced_acc": round(best_score, 5),
        "in_group_acc": float((in_pred == val_local[val_in]).mean()) if len(val_in) else None,
        "generalist_in_group_acc": float((g_in == val_local[val_in]).mean())
        if len(val_in)
        else None,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "examples_seen": seen,
        "seconds": round(time.perf_counter() - t0, 2),
        "n_group_train": int(len(sampler.inside)),
        "n_group_val": int(len(val_in)),
    }

    spec_dir = Path(out_dir) if out_dir is not None else run.specialists_dir
    weights = spec_dir / f"{spec_id:03d}.safetensors"
    save_tensors(
        weights, model.state_dict(), {"architecture": grec.architecture, "classes": len(classes)}
    )
    record = SpecialistRecord(
        id=spec_id,
        classes=classes,
        class_names=[grec.class_names[c] for c in classes],
        group_hash=group_hash(classes, grec.weights_sha256),
        generalist_sha256=grec.weights_sha256,
        architecture=grec.architecture,
        train_fraction=cfg.enrich_fraction,
        natural_prior=natural,
        gated_prior=gated,
        correction=cfg.correction,
        logit_offset=[float(v) for v in offsets],
        metrics=metrics,
        history=history,
        config=asdict(cfg),
        weights_sha256=file_sha256(weights),
    )
    save_json(
        spec_dir / f"{spec_id:03d}.json", record.to_dict()
    )  # last: marks the specialist complete
    return record

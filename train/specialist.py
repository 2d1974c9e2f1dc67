"""Training one specialist: enriched batches, dustbin labels, optional soft targets, early stopping.

``train_specialist`` is one independent job: it reads paths (the run's generalist, the cached data
arrays) and writes its own artifact (weights, then the JSON record that marks it complete) into
``RUN/specialists/``. ``specialist_job`` describes it to the launcher, which runs many in parallel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn

from specialists.dustbin import build_specialist, group_hash, prior_offsets, project_to_group
from specialists.errors import SpecialistsError
from specialists.models import get_classifier, predict_proba
from specialists.records import SpecialistRecord
from specialists.run import RunDir
from specialists.storage import load_npy

from ._faults import maybe_die
from ._job import save_artifact, start_job
from .launch import Job
from .loop import build_optimizer, cosine_with_warmup, train_one_epoch

__all__ = [
    "EnrichedBatchSampler",
    "SpecialistConfig",
    "specialist_job",
    "specialist_task",
    "train_specialist",
]

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
    # (docs/results.md); the best epoch is kept either way.
    patience: int | None = None
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    # weight a of the generalist's soft targets; off by default, like the random head below
    # (docs/design.md, "Findings that set the defaults")
    soft_weight: float = 0.0
    temperature: float = 3.0
    trainable: str = "all"  # all | last (the last stage and the head) | head
    head_init: str = "random"  # random | copy
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
        *,
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


def specialist_job(
    index: int, classes: list[int], generalist_sha256: str, out: str = RunDir.SPECIALISTS
) -> Job:
    """The launcher's job that trains specialist ``index`` for ``classes`` into ``RUN/<out>/``; an
    artifact already there counts as done when it is for the same group of the same generalist."""
    classes = sorted(int(c) for c in classes)
    return Job(
        index,
        out,
        specialist_task,
        SpecialistRecord,
        inputs={"classes": classes},
        identity={"group_hash": group_hash(classes, generalist_sha256)},
    )


def specialist_task(
    run_root: str, job: Job, cfg: SpecialistConfig, *, device: str, threads: int | None
) -> SpecialistRecord:
    """A specialist job, as the launcher runs it."""
    return train_specialist(
        run_root,
        job.id,
        job.inputs["classes"],
        cfg,
        device=device,
        threads=threads,
        out=job.out,
    )


def train_specialist(
    run_dir: str | Path,
    index: int,
    classes: list[int],
    cfg: SpecialistConfig,
    *,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    out: str = RunDir.SPECIALISTS,
) -> SpecialistRecord:
    """Train specialist ``index`` for ``classes`` and write its weights and record into
    ``RUN/<out>/`` (default the run's own specialists)."""
    ctx = start_job(run_dir, device=device, threads=threads)
    run, dev, generalist, grec = ctx.run, ctx.device, ctx.generalist, ctx.record
    classes = sorted(int(c) for c in classes)
    if not classes or min(classes) < 0 or max(classes) >= grec.n_classes:
        raise SpecialistsError(
            f"specialist {index}: classes out of range for {grec.n_classes} classes"
        )
    train_images, train_labels = ctx.train_images, ctx.train_labels
    val_images, val_labels = ctx.val_images, ctx.val_labels
    train_tf, eval_tf = ctx.train_transform, ctx.eval_transform
    images_t = torch.from_numpy(np.array(train_images))  # a private in-memory copy of the map

    torch.manual_seed(cfg.seed + index)
    sampler = EnrichedBatchSampler(
        train_labels,
        classes,
        n_classes=grec.n_classes,
        batch_size=cfg.batch_size,
        fraction=cfg.enrich_fraction,
        seed=cfg.seed + 1000 * index,
    )
    rng = np.random.default_rng([cfg.seed, index, 1])
    sample_idx = rng.choice(len(train_labels), size=min(512, len(train_labels)), replace=False)
    sample = eval_tf(images_t[torch.from_numpy(np.sort(sample_idx))].to(dev))
    model = build_specialist(
        generalist, classes, sample=sample, head_init=cfg.head_init, seed=cfg.seed + index
    )
    model.to(dev)
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
        p = predict_proba(model, val_x, transform=eval_tf, device=dev, batch_size=512, amp=cfg.amp)
        pred = p.argmax(1)
        acc_in = float((pred[: len(val_in)] == val_local[val_in]).mean()) if len(val_in) else 0.0
        acc_out = float((pred[len(val_in) :] == len(classes)).mean()) if len(val_out) else 1.0
        return cfg.enrich_fraction * acc_in + (1 - cfg.enrich_fraction) * acc_out, p

    history: list[dict] = []
    best_score, best_epoch, best_state = -1.0, 0, None
    gen = torch.Generator().manual_seed(cfg.seed + index)
    seen = 0
    for epoch in range(cfg.epochs):
        if cfg.patience is not None and best_epoch and epoch - best_epoch >= cfg.patience:
            break
        stats = train_one_epoch(
            model,
            images_t,
            batches=sampler.batches(examples),
            targets=lambda idx: local_labels[torch.from_numpy(idx)],
            transform=train_tf,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            device=dev,
            amp=cfg.amp,
            generator=gen,
            desc=f"specialist {index} epoch {epoch + 1}",
            progress=progress,
        )
        maybe_die("specialist", index, epoch + 1)
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
        "seconds": ctx.seconds(),
        "n_group_train": int(len(sampler.inside)),
        "n_group_val": int(len(val_in)),
    }

    return save_artifact(
        run.artifact(out, index),
        model,
        metadata={"architecture": grec.architecture, "classes": len(classes)},
        make_record=lambda weights_sha256: SpecialistRecord(
            id=index,
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
            weights_sha256=weights_sha256,
        ),
    )

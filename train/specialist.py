"""Training one specialist: enriched batches, dustbin labels, optional soft targets, early stopping.

``train_specialist`` is one independent job: it reads paths (the run's generalist, the cached data
arrays) and writes its own artifact (weights, then the JSON record that marks it complete) into
``RUN/specialists/``. ``specialist_job`` describes it to the launcher, which runs many in parallel.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from torch import nn

from specialists.artifacts import generalist_record
from specialists.dustbin import build_specialist, group_hash, prior_offsets, project_to_group
from specialists.errors import SpecialistsError
from specialists.models import (
    create_model,
    get_classifier,
    model_from_checkpoint,
    predict_proba,
)
from specialists.records import GeneralistRecord, SpecialistRecord
from specialists.run import RunDir
from specialists.storage import load_npy
from specialists.transforms import BatchTransform
from specialists.trunk import find_shared_trunk

from ._faults import maybe_die
from ._job import mapped_tensor, own_size, save_artifact, start_job
from .launch import Job
from .loop import build_optimizer, cosine_with_warmup, train_one_epoch

__all__ = [
    "EnrichedBatchSampler",
    "SpecialistConfig",
    "specialist_job",
    "specialist_jobs",
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
    min_steps_per_epoch: int = 25  # an epoch is at least this many batches
    # Stop after `patience` epochs without a better validation score. Off by default: stopping
    # while the cosine schedule's learning rate is still high leaves the specialist unsettled
    # (docs/results.md); the best epoch is kept either way.
    patience: int | None = None
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05  # decoupled (AdamW) or L2 (SGD)
    warmup_epochs: float = 0.5  # linear warm-up, then a cosine schedule to zero
    # weight a of the generalist's soft targets; off by default, like the random head below
    # (docs/design.md, "Findings that set the defaults")
    soft_weight: float = 0.0
    temperature: float = 3.0
    trainable: str = "all"  # all | last (the last stage and the head) | head
    head_init: str = "random"  # random | copy
    correction: str = "gated"  # gated | natural | none
    seed: int = 0
    amp: str = "auto"  # mixed precision on CUDA: auto (bf16 where supported) | bf16 | fp16 | off
    # What a specialist is (default: the generalist's architecture at the generalist's input
    # size). One of the generalist's architecture starts from its weights at any input size;
    # another starts fresh, or from `checkpoint` (local weights; the head is always new).
    model: str | None = None
    input_size: int | None = None
    checkpoint: str | None = None
    # Per-group overrides of the three above: {group id: {model: ..., input_size: ...}}.
    groups: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # group ids as strings, as they come back from a record's JSON (so a rerun compares equal)
        try:
            self.groups = {str(int(k)): v for k, v in self.groups.items()}
        except (TypeError, ValueError):
            bad = next(k for k in self.groups if not str(k).lstrip("-").isdigit())
            raise ValueError(f"groups: {bad!r} is not a group id") from None
        if self.input_size is not None and self.input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {self.input_size}")
        for key, over in self.groups.items():
            unknown = set(over) - MEMBER_KEYS if isinstance(over, dict) else None
            if unknown is None or unknown:
                raise ValueError(
                    f"groups: {key}: expected a mapping with keys among {', '.join(sorted(MEMBER_KEYS))}"
                )
            size = over.get("input_size")
            if size is not None and (not isinstance(size, int) or size < 8):
                raise ValueError(f"groups: {key}: input_size must be an integer >= 8, got {size!r}")
        if not 0 < self.enrich_fraction < 1:
            raise ValueError(f"enrich_fraction must be in (0, 1), got {self.enrich_fraction}")
        if self.trainable not in ("all", "last", "head"):
            raise ValueError(f"trainable must be all, last or head, got {self.trainable!r}")
        if self.correction not in ("gated", "natural", "none"):
            raise ValueError(f"correction must be gated, natural or none, got {self.correction!r}")
        if not 0 <= self.soft_weight <= 1:
            raise ValueError(f"soft_weight must be in [0, 1], got {self.soft_weight}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")

    def member(self, index: int, generalist: GeneralistRecord) -> tuple[str, int, str | None]:
        """(architecture, input size, checkpoint) of specialist ``index``: its group's override,
        else the run-wide setting, else the generalist's."""
        over = self.groups.get(str(index), {})
        # a group's own model does not inherit the run-wide checkpoint (made for another model)
        ckpt = (
            over.get("checkpoint") if "model" in over else over.get("checkpoint", self.checkpoint)
        )
        return (
            over.get("model") or self.model or generalist.architecture,
            int(over.get("input_size") or self.input_size or generalist.input_size),
            ckpt,
        )


MEMBER_KEYS = {"model", "input_size", "checkpoint"}


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


def check_member(
    arch: str,
    size: int,
    ckpt: str | None,
    grec: GeneralistRecord,
    *,
    what: str,
    load_checkpoint: bool = True,
) -> None:
    """One clear line when a specialist's architecture, input size or checkpoint cannot work:
    an unknown timm model, an input size below the generalist's (a specialist should see at least
    as much), a checkpoint that is missing or does not fit (``load_checkpoint``: loaded here;
    a job skips it, its driver has loaded it and the job loads it to start from)."""
    if not timm.is_model(arch):
        create_model(arch, 2)  # raises the "unknown timm model" error with suggestions
    if size < grec.input_size:
        raise SpecialistsError(
            f"{what}: input size {size} is below the generalist's {grec.input_size}; a specialist "
            "sees its images at least as large as the generalist does"
        )
    if ckpt is not None and load_checkpoint:  # a bad file stops before any job starts
        path = str(Path(ckpt).expanduser())
        model_from_checkpoint(arch, 2, grec.in_chans, size, path, reset_head=True)


def _specialist_model(
    generalist: nn.Module,
    grec: GeneralistRecord,
    classes: list[int],
    cfg: SpecialistConfig,
    *,
    arch: str,
    size: int,
    ckpt: str | None,
    sample: torch.Tensor,
    index: int,
) -> nn.Module:
    """The specialist before training: the generalist's copy with a new head (its architecture,
    any input size: convolution weights do not depend on it), or a fresh model of another
    architecture, or one started from a local checkpoint (its head replaced)."""
    if arch == grec.architecture and ckpt is None:
        model = build_specialist(
            generalist, classes, sample=sample, head_init=cfg.head_init, seed=cfg.seed + index
        )
    else:
        if cfg.head_init == "copy":
            raise SpecialistsError(
                f"specialist {index}: head_init copy needs the generalist's own weights "
                f"({arch}{' from ' + str(ckpt) if ckpt else ''} has none of them)"
            )
        torch.manual_seed(cfg.seed + index)
        n_out = len(classes) + 1
        if ckpt is not None:
            path = str(Path(ckpt).expanduser())
            model = model_from_checkpoint(arch, n_out, grec.in_chans, size, path, reset_head=True)
        else:
            model = create_model(arch, n_out, grec.in_chans, size)
    if size != grec.input_size:
        device = next(generalist.parameters()).device
        probe = torch.zeros(2, grec.in_chans, size, size, device=device)
        was_training = model.training
        model.to(device).eval()
        try:
            with torch.no_grad():
                model(probe)
        except Exception as e:  # a model fixed to one input size (a transformer's patch grid)
            raise SpecialistsError(
                f"specialist {index}: {arch} does not take {size} px inputs "
                f"({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from e
        model.train(was_training)
    return model


def specialist_job(
    index: int,
    classes: list[int],
    generalist_sha256: str,
    out: str = RunDir.SPECIALISTS,
    *,
    member: tuple[str, int | None, str | None] | None = None,
) -> Job:
    """The launcher's job that trains specialist ``index`` for ``classes`` into ``RUN/<out>/``; an
    artifact already there counts as done when it is for the same group of the same generalist
    (and, with ``member`` = (architecture, input size or None for the generalist's, checkpoint),
    of the same architecture at the same input size)."""
    classes = sorted(int(c) for c in classes)
    identity: dict = {"group_hash": group_hash(classes, generalist_sha256)}
    inputs: dict = {"classes": classes}
    if member is not None:
        arch, size, ckpt = member
        identity.update(architecture=arch, input_size=size)
        inputs.update(architecture=arch, input_size=size, checkpoint=ckpt)
    return Job(index, out, specialist_task, SpecialistRecord, inputs=inputs, identity=identity)


def specialist_jobs(
    groups: list[list[int]],
    grec: GeneralistRecord,
    cfg: SpecialistConfig,
    *,
    ids: list[int] | range | None = None,
    out: str = RunDir.SPECIALISTS,
) -> list[Job]:
    """The launcher's jobs for ``groups`` (only ``ids``), every specialist's architecture, input
    size and checkpoint checked first, so bad settings stop before any job starts."""
    unknown = sorted(int(k) for k in cfg.groups if not 0 <= int(k) < len(groups))
    if unknown:
        raise SpecialistsError(
            f"groups: {unknown[0]}: no such group (the run has groups 0..{len(groups) - 1})"
        )
    jobs = []
    for i in range(len(groups)) if ids is None else ids:
        arch, size, ckpt = cfg.member(i, grec)
        check_member(arch, size, ckpt, grec, what=f"specialist {i}")
        member = (arch, None if size == grec.input_size else size, ckpt)
        jobs.append(specialist_job(i, groups[i], grec.weights_sha256, out, member=member))
    return jobs


def specialist_task(
    run_root: str, job: Job, cfg: SpecialistConfig, *, device: str, threads: int | None
) -> SpecialistRecord:
    """A specialist job, as the launcher runs it."""
    member = None
    if "architecture" in job.inputs:
        member = tuple(job.inputs[k] for k in ("architecture", "input_size", "checkpoint"))
    return train_specialist(
        run_root,
        job.id,
        job.inputs["classes"],
        cfg,
        device=device,
        threads=threads,
        out=job.out,
        member=member,
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
    member: tuple[str, int | None, str | None] | None = None,
) -> SpecialistRecord:
    """Train specialist ``index`` for ``classes`` and write its weights and record into
    ``RUN/<out>/`` (default the run's own specialists). ``member``: (architecture, input size,
    checkpoint), by default ``cfg.member(index, ...)``."""
    grec = generalist_record(RunDir.of(run_dir))
    arch, size, ckpt = member if member is not None else cfg.member(index, grec)
    size = size or grec.input_size
    check_member(arch, size, ckpt, grec, what=f"specialist {index}", load_checkpoint=False)
    ctx = start_job(run_dir, device=device, threads=threads, input_size=own_size(size, grec))
    run, dev, generalist, grec = ctx.run, ctx.device, ctx.generalist, ctx.record
    classes = sorted(int(c) for c in classes)
    if not classes or min(classes) < 0 or max(classes) >= grec.n_classes:
        raise SpecialistsError(
            f"specialist {index}: classes out of range for {grec.n_classes} classes"
        )
    train_images, train_labels = ctx.train_images, ctx.train_labels
    val_images, val_labels = ctx.val_images, ctx.val_labels
    # the specialist's own view at its input size; the generalist's is ctx.eval_transform
    train_tf = BatchTransform(grec.mean, grec.std, size, augment=True, hflip=grec.hflip)
    eval_tf = BatchTransform(grec.mean, grec.std, size)
    images_t = mapped_tensor(train_images)  # the shared memory map, not a private copy

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
    sample = ctx.eval_transform(images_t[torch.from_numpy(np.sort(sample_idx))].to(dev))
    model = _specialist_model(
        generalist, grec, classes, cfg, arch=arch, size=size, ckpt=ckpt, sample=sample, index=index
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
            if size != grec.input_size:  # the generalist sees the same crop at its own size
                x = F.interpolate(x, size=(grec.input_size,) * 2, mode="bilinear", antialias=True)
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
    # what it shares with the generalist, found from the weights (none for another architecture
    # or input size): inference then runs those stages once for all specialists
    shared = None
    if arch == grec.architecture and size == grec.input_size:
        shared = find_shared_trunk(model, generalist)

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
        metadata={"architecture": arch, "classes": len(classes)},
        make_record=lambda weights_sha256: SpecialistRecord(
            id=index,
            classes=classes,
            class_names=[grec.class_names[c] for c in classes],
            group_hash=group_hash(classes, grec.weights_sha256),
            generalist_sha256=grec.weights_sha256,
            architecture=arch,
            input_size=None if size == grec.input_size else size,
            shared_trunk=None if shared is None else shared.to_dict(),
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

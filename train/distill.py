"""Distillation: one student trained on a teacher's combined distribution plus the hard labels.

The teacher is the calibrated ensemble (its q, the optimum of the KL combiner, with the run's own
weights and dustbin correction, gated top-1 unless ``teacher_top_n`` says otherwise), or for the
controls the generalist alone (self-distillation) or the ensemble of the random groups. The
student minimises, per labelled example,

    (1 - a) CE(y, s) + a T^2 KL(q_T || s_T),

q_T being q^(1/T) renormalised and s_T the student's softmax at temperature T; images without
labels (``transfer``) contribute the soft term alone. A ``cached`` teacher (the default) scores
the un-augmented images once; an ``online`` one runs on the very batch the student sees,
augmentation included.

Each student is one job of the launcher (local or Ray): it resumes after a kill from its last
finished epoch and writes its weights, then its record, into ``RUN/student/`` (or a control's
folder), with ``history.csv`` and ``curve.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from specialists import manifest
from specialists.artifacts import generalist_record, load_specialists
from specialists.ensemble import Ensemble
from specialists.errors import SpecialistsError
from specialists.lock import writes_run
from specialists.models import (
    create_model,
    model_from_checkpoint,
    predict_proba,
)
from specialists.records import GeneralistRecord, StudentRecord
from specialists.run import RunDir
from specialists.sources import load_unlabelled
from specialists.storage import atomic_write_text, load_npy, save_npy

from ._faults import maybe_die
from ._job import (
    JobContext,
    base_size,
    cache_sizes,
    mapped_tensor,
    own_size,
    save_artifact,
    start_job,
)
from ._state import checkpoint, resume
from .launch import Job, JobResult, run_jobs
from .loop import (
    build_optimizer,
    cosine_with_warmup,
    history_csv,
    plot_history,
    shuffled_batches,
    train_one_epoch,
)

__all__ = ["TEACHERS", "DistillConfig", "distill_job", "distill_loss", "run_distill", "soften"]

log = logging.getLogger(__name__)

# A teacher's name -> the folder of the ensemble it combines (None: the run's own; "" for the
# generalist alone, which needs no ensemble) and the folder its student is written to.
TEACHERS: dict[str, tuple[str | None, str]] = {
    "ensemble": (None, RunDir.STUDENT),
    "generalist": ("", RunDir.SELF_STUDENT_CONTROL),
    "random groups": (RunDir.RANDOM_CONTROL, RunDir.RANDOM_STUDENT_CONTROL),
}


@dataclass
class DistillConfig:
    """How a student is distilled (written into its record)."""

    model: str | None = None  # any timm name; default the generalist's architecture
    # generalist (its weights; needs its architecture), random, or a checkpoint's path;
    # default: generalist when the architectures match, else random
    init: str | None = None
    # cached: the teacher scores the un-augmented images once; online: every augmented batch.
    # Cached won on the demo (docs/results.md, "Distillation") and costs a fraction of online.
    teacher_mode: str = "cached"
    # the teacher's gating width: 1 consults only the specialists of the generalist's top class,
    # a sharper q to learn from than a wider calibrated gate (Omniglot, docs/results.md,
    # "Distillation"); 0 keeps the calibrated width
    teacher_top_n: int = 1
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the soft term; 1 - alpha on the hard labels
    epochs: int = 50
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.05  # decoupled (AdamW) or L2 (SGD)
    warmup_epochs: float = 1.0  # linear warm-up, then a cosine schedule to zero
    transfer: str | None = None  # a data source or a folder of images, used without labels
    seed: int = 0
    amp: str = "auto"  # mixed precision on CUDA: auto (bf16 where supported) | bf16 | fp16 | off

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.teacher_mode not in ("online", "cached"):
            raise ValueError(f"teacher must be online or cached, got {self.teacher_mode!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.teacher_top_n < 0:
            raise ValueError(
                f"teacher_top_n must be >= 0 (0: the calibrated width), got {self.teacher_top_n}"
            )


def soften(q: torch.Tensor, temperature: float) -> torch.Tensor:
    """log of q^(1/T), renormalised over the classes (B, K); exact zeros stay -inf."""
    logq = torch.log(q.double().clamp_min(0.0)) / temperature
    return (logq - torch.logsumexp(logq, dim=1, keepdim=True)).float()


def distill_loss(
    logits: torch.Tensor,
    q: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Mean over the batch of (1 - a) CE(y, s) + a T^2 KL(q_T || s_T); rows labelled -1 (images
    without labels) take the soft term alone."""
    log_qt = soften(q, temperature)  # (B, K)
    log_st = F.log_softmax(logits.float() / temperature, dim=1)  # (B, K)
    qt = log_qt.exp()
    kl = torch.where(qt > 0, qt * (log_qt - log_st), torch.zeros_like(qt)).sum(1)  # (B,)
    loss = alpha * temperature**2 * kl
    labelled = labels >= 0
    if alpha < 1 and bool(labelled.any()):
        ce = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
        loss = loss + (1 - alpha) * torch.where(labelled, ce, torch.zeros_like(ce))
    return loss.mean()


# --------------------------------------------------------------------------------------------
# The driver: checks, teacher identities, jobs


def _teacher_sha256(run: RunDir, teacher: str, grec: GeneralistRecord) -> str:
    """Identity of a teacher: the generalist, plus the groups, specialists and combination of
    its ensemble. A student counts as done only for the same teacher."""
    variant, _ = TEACHERS[teacher]
    parts: dict = {"generalist": grec.weights_sha256}
    if variant != "":
        paths = run.ensemble(variant)
        if not paths.combination.is_file():
            raise SpecialistsError(
                f"{paths.combination}: no calibrated ensemble to distil "
                f"(run `specialists train {run.root}`{' and `specialists controls`' if variant else ''} first)"
            )
        records = load_specialists(run, grec, variant=variant or None)
        parts.update(
            combination=manifest.checked_sha256(run.root, paths.combination),
            groups=manifest.checked_sha256(run.root, paths.clusters),
            specialists=[r.weights_sha256 for r in records],
        )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _student_kind(cfg: DistillConfig, grec: GeneralistRecord) -> tuple[str, str]:
    """(architecture, init) of the student: the generalist's architecture by default, started
    from the generalist's weights when it has that architecture, else from random weights."""
    arch = cfg.model or grec.architecture
    return arch, cfg.init or ("generalist" if arch == grec.architecture else "random")


def _check_student(cfg: DistillConfig, grec: GeneralistRecord) -> None:
    """Fail before any training on a student that cannot be built."""
    arch, init = _student_kind(cfg, grec)
    if not timm.is_model(arch):
        create_model(arch, 2)  # the clear "unknown timm model" error
    if init == "generalist" and arch != grec.architecture:
        raise SpecialistsError(
            f"--init generalist: the student is a {arch}, the generalist a {grec.architecture} "
            "(use --init random or a checkpoint of the student's architecture)"
        )
    if init not in ("generalist", "random"):
        model_from_checkpoint(arch, grec.n_classes, grec.in_chans, grec.input_size, init)


def _cache_transfer(
    run: RunDir, cfg: DistillConfig, grec: GeneralistRecord, size: int | None
) -> None:
    """Read the transfer images once, in the driver (a bad folder is one line here, not a failed
    job), into the run's cache at the data's own size, or at ``size`` for a teacher whose
    specialists need larger images."""
    if cfg.transfer is None:
        return
    path = run.transfer_cache(cfg.transfer, size)
    if path.is_file():
        return
    size = size or base_size(run)
    images = load_unlabelled(cfg.transfer, size=size, channels=grec.in_chans, seed=cfg.seed)
    log.info("%d transfer images from %s, used without labels", len(images), cfg.transfer)
    save_npy(path, images)


def _teacher_size(run: RunDir, teacher: str, grec: GeneralistRecord) -> int:
    """The largest input size among the models the teacher runs."""
    variant, _ = TEACHERS[teacher]
    if variant == "":
        return grec.input_size
    return Ensemble.load(run.root, "cpu", variant=variant).input_size  # the kept specialists


def _above(run: RunDir, size: int | None) -> int | None:
    """The cache size a job of input ``size`` reads: None (the data's own) unless above it."""
    return size if size is not None and size > base_size(run) else None


def distill_job(
    run: RunDir, teacher: str, grec: GeneralistRecord, input_size: int | None = None
) -> Job:
    """The launcher's job that distils the student of ``teacher`` (a key of ``TEACHERS``);
    ``input_size``: the teacher needs images that large (specialists with their own size)."""
    _, out = TEACHERS[teacher]
    identity = {"teacher": teacher, "teacher_sha256": _teacher_sha256(run, teacher, grec)}
    inputs = {**identity, "input_size": input_size}
    return Job(0, out, distill_task, StudentRecord, inputs=inputs, identity=identity)


@writes_run("specialists distill")
def run_distill(
    run_dir: str | Path,
    cfg: DistillConfig | None = None,
    *,
    controls: bool = False,
    workers: int | None = None,
    backend: str = "local",
    device: str = "auto",
    ray_address: str | None = None,
    gpus_per_job: float | None = None,
    progress: bool = True,
) -> list[JobResult]:
    """Distil the run's calibrated ensemble into one student (only if it is missing or stale);
    with ``controls``, also the self-distilled student of the generalist alone and, where the
    run has the random-groups control, the student of that ensemble."""
    cfg = cfg or DistillConfig()
    run = RunDir.of(run_dir)
    run.require_generalist()
    grec = generalist_record(run)
    if not run.cache_labels("val").is_file():
        raise SpecialistsError(
            f"{run.root}: no specialists trained in this run (run `specialists train {run.root}` first)"
        )
    _check_student(cfg, grec)
    if cfg.teacher_top_n > grec.n_classes:
        raise SpecialistsError(
            f"--teacher-top-n {cfg.teacher_top_n}: must be between 1 and {grec.n_classes}"
        )
    teachers = ["ensemble"]
    if controls:
        teachers.append("generalist")
        if run.ensemble(RunDir.RANDOM_CONTROL).combination.is_file():
            teachers.append("random groups")
    for t in teachers:  # a missing teacher is its own clear error, before anything else
        _teacher_sha256(run, t, grec)
    sizes = {t: _teacher_size(run, t, grec) for t in teachers}
    size = max(sizes.values())
    if size > grec.input_size and cfg.teacher_mode == "online":
        raise SpecialistsError(
            f"--teacher online: the specialists take {size} px inputs, the student "
            f"{grec.input_size} px; the teacher must see the originals (use --teacher cached)"
        )
    cache_sizes(run, grec, [size])
    jobs = [distill_job(run, t, grec, own_size(sizes[t], grec)) for t in teachers]
    for job_size in {j.inputs["input_size"] for j in jobs}:  # each job reads its own size
        _cache_transfer(run, cfg, grec, _above(run, job_size))
    return run_jobs(
        run,
        jobs,
        cfg=cfg,
        generalist_sha=grec.weights_sha256,
        backend=backend,
        workers=workers,
        device=device,
        ray_address=ray_address,
        gpus_per_job=gpus_per_job,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# The job: one student


def _teacher(
    ctx: JobContext, teacher: str, cfg: DistillConfig
) -> Callable[[torch.Tensor], torch.Tensor]:
    """q (B, K) of ``teacher`` for a transformed batch (and the uint8 batch it was made from,
    which specialists with their own input size resize from)."""
    variant, _ = TEACHERS[teacher]
    if variant == "":
        generalist = ctx.generalist

        @torch.no_grad()
        def generalist_q(x: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
            return torch.softmax(generalist(x).float(), 1)

        return generalist_q
    ensemble = Ensemble.load(
        ctx.run.root,
        str(ctx.device),
        variant=variant,
        top_n=cfg.teacher_top_n or None,
        amp=cfg.amp,
    )
    return lambda x, raw=None: ensemble.combine_transformed(x, raw)[0]


def _student_model(ctx: JobContext, cfg: DistillConfig) -> nn.Module:
    grec = ctx.record
    arch, init = _student_kind(cfg, grec)
    if init == "generalist":
        model = create_model(arch, grec.n_classes, grec.in_chans, grec.input_size)
        model.load_state_dict(ctx.generalist.state_dict())
        return model.to(ctx.device)
    torch.manual_seed(cfg.seed)
    if init != "random":
        model = model_from_checkpoint(arch, grec.n_classes, grec.in_chans, grec.input_size, init)
    else:
        model = create_model(arch, grec.n_classes, grec.in_chans, grec.input_size)
    return model.to(ctx.device)


@torch.no_grad()
def _teacher_q(
    teach: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, ctx: JobContext
) -> np.ndarray:
    """The teacher's q (N, K) float32 on un-augmented images, in batches."""
    out = []
    for start in range(0, len(images), 512):
        x = torch.from_numpy(np.array(images[start : start + 512])).to(ctx.device)
        out.append(teach(ctx.eval_transform(x), x).float().cpu())
    return torch.cat(out).numpy()


def distill_task(
    run_root: str, job: Job, cfg: DistillConfig, *, device: str, threads: int | None
) -> StudentRecord:
    """Distil the student of ``job.inputs["teacher"]`` into ``RUN/<job.out>/``."""
    teacher_name = job.inputs["teacher"]
    size = job.inputs.get("input_size")
    ctx = start_job(run_root, device=device, threads=threads, input_size=size)
    run, dev, grec = ctx.run, ctx.device, ctx.record
    paths = run.student(job.out)
    teach = _teacher(ctx, teacher_name, cfg)

    images = ctx.train_images  # the shared memory map
    labels = ctx.train_labels.astype(np.int64)
    if cfg.transfer is not None:  # joined in memory with the transfer images
        extra = load_npy(run.transfer_cache(cfg.transfer, _above(run, size)))
        images = np.concatenate([images, extra])
        labels = np.concatenate([labels, np.full(len(extra), -1, dtype=np.int64)])
    images_t, labels_t = mapped_tensor(images), torch.from_numpy(labels)
    val_images = ctx.val_images
    q_val = _teacher_q(teach, val_images, ctx)
    teacher_val_acc = float((q_val.argmax(1) == ctx.val_labels).mean())

    q_cached = None
    if cfg.teacher_mode == "cached":
        q_cached = torch.from_numpy(_teacher_q(teach, images, ctx))

    model = _student_model(ctx, cfg)
    steps_per_epoch = max(1, len(labels) // cfg.batch_size)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = cosine_with_warmup(
        optimizer, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    )
    batch_index: dict[str, torch.Tensor] = {}

    def targets(idx: np.ndarray) -> torch.Tensor:
        batch_index["idx"] = torch.from_numpy(np.asarray(idx))  # the cached teacher's rows
        return labels_t[batch_index["idx"]]

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # online: the teacher sees the student's own augmented batch
        q = teach(x) if q_cached is None else q_cached[batch_index["idx"]].to(logits.device)
        return distill_loss(logits, q, y, temperature=cfg.temperature, alpha=cfg.alpha)

    key = {"config": asdict(cfg), "teacher_sha256": job.inputs["teacher_sha256"]}
    state = resume(paths.resume_dir, key, model, optimizer, scheduler, other_key="restart")
    history, start_epoch = state.history, state.epoch
    if start_epoch:
        log.warning("resuming the student in %s from epoch %d", paths.base, start_epoch)

    predict = {"transform": ctx.eval_transform, "device": dev, "amp": cfg.amp}
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch seeds: a resumed run is identical
        batches = shuffled_batches(
            len(labels), cfg.batch_size, np.random.default_rng([cfg.seed, epoch, 7])
        )
        stats = train_one_epoch(
            model,
            images_t,
            batches=batches,
            targets=targets,
            transform=ctx.train_transform,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            device=dev,
            amp=cfg.amp,
            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
            desc=f"student epoch {epoch + 1}",
            progress=False,
        )
        maybe_die("student", epoch + 1)
        probs = predict_proba(model, val_images, **predict)
        val_acc = float((probs.argmax(1) == ctx.val_labels).mean())
        picked = probs[np.arange(len(probs)), ctx.val_labels]
        history.append(
            {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": round(stats["train_loss"], 5),
                "train_acc": round(stats["train_acc"], 5),
                "val_loss": round(float(-np.log(np.maximum(picked, 1e-12)).mean()), 5),
                "val_acc": round(val_acc, 5),
                "val_agreement": round(float((probs.argmax(1) == q_val.argmax(1)).mean()), 5),
                "images_per_second": round(stats["images_per_second"], 1),
            }
        )
        state.epoch = epoch + 1
        state.offer(val_acc, model)
        checkpoint(paths.resume_dir, key, state, model, optimizer, scheduler)

    best = state.best
    assert state.best_model is not None
    model.load_state_dict(state.best_model)
    atomic_write_text(paths.history, history_csv(history))
    plot_history(history, best["epoch"], paths.curve)
    best_row = history[best["epoch"] - 1]
    metrics = {
        "val_acc": best["val_acc"],
        "val_agreement": best_row["val_agreement"],
        "teacher_val_acc": teacher_val_acc,
        "generalist_val_acc": grec.metrics["val_accuracy"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "n_train": int((labels >= 0).sum()),
        "n_transfer": int((labels < 0).sum()),
        "seconds": ctx.seconds(),
    }
    model_arch, _ = _student_kind(cfg, grec)
    record = save_artifact(
        paths.files,
        model,
        metadata={"architecture": model_arch},
        make_record=lambda weights_sha256: StudentRecord(
            id=job.id,
            architecture=model_arch,
            n_classes=grec.n_classes,
            teacher=teacher_name,
            teacher_sha256=job.inputs["teacher_sha256"],
            generalist_sha256=grec.weights_sha256,
            config=asdict(cfg),
            metrics=metrics,
            history=history,
            weights_sha256=weights_sha256,
        ),
    )
    shutil.rmtree(paths.resume_dir, ignore_errors=True)
    return record

"""Generalist training: any timm model over all classes, written into a run directory."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from specialists import manifest
from specialists._version import software_versions
from specialists.config import write_config
from specialists.data import DataBundle, accuracy_gap_warning, split_warning
from specialists.datasets import DATASET
from specialists.errors import SpecialistsError
from specialists.lock import writes_run
from specialists.models import (
    checkpoint_config,
    create_model,
    model_from_checkpoint,
    predict_proba,
    resolve_device,
    set_cpu_threads,
)
from specialists.records import GeneralistRecord
from specialists.run import RunDir
from specialists.sources import load_data, parse_source
from specialists.storage import (
    atomic_write_text,
    check_writable,
    file_sha256,
    save_json,
    save_npy,
    save_tensors,
)
from specialists.transforms import BatchTransform

from ._faults import maybe_die
from ._job import cache_data, mapped_tensor
from ._state import checkpoint, resume
from .loop import (
    build_optimizer,
    cosine_with_warmup,
    history_csv,
    plot_history,
    shuffled_batches,
    train_one_epoch,
)

__all__ = ["GeneralistConfig", "train_generalist"]

log = logging.getLogger(__name__)


@dataclass
class GeneralistConfig:
    """Everything that decides a generalist; written to RUN/config.yaml."""

    model: str = "test_efficientnet"
    data: str = "embedded"
    epochs: int = 10  # short, for a first run; raise it for a real baseline
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.05  # decoupled (AdamW) or L2 (SGD)
    momentum: float = 0.9  # SGD only
    warmup_epochs: float = 1.0  # linear warm-up, then a cosine schedule to zero
    label_smoothing: float = 0.0
    patience: int = 4  # early stopping: epochs without a better validation accuracy
    input_size: int | None = None  # default: the data's native size
    val_fraction: float = 0.1
    augment: bool = True  # random crops with padding (and flips where the data allows)
    hflip: bool | None = None  # default: what the data source says makes sense
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # mixed precision on CUDA: auto (bf16 where supported) | bf16 | fp16 | off
    threads: int | None = None
    checkpoint: str | None = None
    reset_head: bool = False
    normalize: str = "auto"  # auto: the checkpoint's mean and std when it carries them, else data
    eval_batch_size: int = 512  # batch size when predicting

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.normalize not in ("auto", "data", "checkpoint"):
            raise ValueError(f"normalize must be auto, data or checkpoint, got {self.normalize!r}")
        if self.normalize == "checkpoint" and not self.checkpoint:
            raise ValueError("normalize checkpoint needs a checkpoint")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def _normalization(cfg: GeneralistConfig, ck: dict, bundle: DataBundle) -> tuple[list, list]:
    """Mean and std per channel: the checkpoint's (its config.json) when it has them and
    ``cfg.normalize`` allows, else the data's; averaged or repeated to the data's channels."""
    if cfg.normalize == "checkpoint" and "mean" not in ck:
        raise SpecialistsError(
            f"{cfg.checkpoint}: --normalize checkpoint, but no config.json with a mean and std "
            "beside it"
        )
    if cfg.normalize == "data" or "mean" not in ck:
        return bundle.mean_std()
    c = bundle.channels
    mean, std = ck["mean"], ck["std"]
    if len(mean) != c:  # RGB statistics for gray data (timm sums the first convolution)
        mean, std = [float(np.mean(mean))] * c, [float(np.mean(std))] * c
    log.info("normalising with the checkpoint's mean %s and std %s", mean, std)
    return list(mean), list(std)


@writes_run("specialists generalist", "out", create=True)
def train_generalist(
    cfg: GeneralistConfig,
    out: str | Path,
    *,
    bundle: DataBundle | None = None,
    progress: bool = True,
    force: bool = False,
) -> GeneralistRecord:
    """Train (or resume training) a generalist into ``out``; returns its record.

    Validates data, model and output directory before writing anything, so bad input leaves
    nothing half-written. Each epoch's state is saved atomically; rerunning the same command
    after a kill resumes from the last finished epoch.
    """
    run = RunDir.of(out)
    if run.generalist_record.is_file() and not force:
        raise SpecialistsError(
            f"{run.generalist_record}: a generalist is already trained here (use --force to retrain)"
        )
    check_writable(run.root)
    if not timm.is_model(cfg.model):
        create_model(
            cfg.model, 2
        )  # raises the clear "unknown timm model" error before loading data
    ck = checkpoint_config(cfg.checkpoint) if cfg.checkpoint else {}
    source = parse_source(
        cfg.data,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        image_size=cfg.input_size or ck.get("input_size"),
    )
    if bundle is None:
        bundle = load_data(source)
    else:  # data given in Python: the run records (and, for datasets, caches) what it was given
        source = bundle.source
    input_size = cfg.input_size or ck.get("input_size") or bundle.image_size
    hflip = bundle.hflip if cfg.hflip is None else cfg.hflip
    device = resolve_device(cfg.device)
    threads = set_cpu_threads(cfg.threads) if device.type == "cpu" else None
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        model = model_from_checkpoint(
            cfg.model,
            bundle.n_classes,
            bundle.channels,
            input_size,
            cfg.checkpoint,
            reset_head=cfg.reset_head,
        )
    else:
        model = create_model(cfg.model, bundle.n_classes, bundle.channels, input_size)
    model.to(device)

    warnings = [w for w in [split_warning(bundle)] if w]
    for w in warnings:
        log.warning(w)
    mean, std = _normalization(cfg, ck, bundle)
    train_tf = BatchTransform(mean, std, input_size, augment=cfg.augment, hflip=hflip)
    eval_tf = BatchTransform(mean, std, input_size)
    images = mapped_tensor(bundle.train.images)  # a memory map for decoded folders: no copy
    labels = torch.from_numpy(bundle.train.labels)
    steps_per_epoch = max(1, len(bundle.train) // cfg.batch_size)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    scheduler = cosine_with_warmup(
        optimizer, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    )

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    run.generalist_dir.mkdir(parents=True, exist_ok=True)
    write_config(run.config, cfg)
    # the cached arrays are this generalist's data: a retrained one (--force) gets its own
    shutil.rmtree(run.root / "cache", ignore_errors=True)
    if source.kind == DATASET:  # nothing else can read data given in Python again
        cache_data(run, bundle, splits=("train", "val", "test"))
    state = resume(run.resume_dir, asdict(cfg), model, optimizer, scheduler)
    if state.epoch:
        log.warning("resuming %s from epoch %d", run.root, state.epoch)
    history, start_epoch = state.history, state.epoch

    log.info(
        "generalist %s (%.2fM params) on %s: %d classes, %d train / %d val images, input %d, device %s%s",
        cfg.model,
        sum(p.numel() for p in model.parameters()) / 1e6,
        source.describe(),
        bundle.n_classes,
        len(bundle.train),
        len(bundle.val),
        input_size,
        device,
        f" ({threads} threads)" if threads else "",
    )
    val_images = mapped_tensor(bundle.val.images)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        best = state.best
        if epoch - best["epoch"] >= cfg.patience and best["epoch"] > 0:
            log.info("early stop: no better validation accuracy for %d epochs", cfg.patience)
            break
        torch.manual_seed(cfg.seed * 1000 + epoch)  # per-epoch seeds make a resumed run identical
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        batches = shuffled_batches(
            len(bundle.train), cfg.batch_size, np.random.default_rng([cfg.seed, epoch])
        )
        stats = train_one_epoch(
            model,
            images,
            batches=batches,
            targets=lambda idx: labels[torch.from_numpy(idx)],
            transform=train_tf,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            device=device,
            amp=cfg.amp,
            generator=gen,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            progress=progress,
        )
        maybe_die("generalist", epoch + 1)
        probs = predict_proba(
            model,
            val_images,
            transform=eval_tf,
            device=device,
            batch_size=cfg.eval_batch_size,
            amp=cfg.amp,
        )
        val_acc = float((probs.argmax(1) == bundle.val.labels).mean())
        val_loss = float(
            -np.log(np.maximum(probs[np.arange(len(probs)), bundle.val.labels], 1e-12)).mean()
        )
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": round(stats["train_loss"], 5),
            "train_acc": round(stats["train_acc"], 5),
            "val_loss": round(val_loss, 5),
            "val_acc": round(val_acc, 5),
            "images_per_second": round(stats["images_per_second"], 1),
            "seconds": round(stats["seconds"], 2),
        }
        history.append(row)
        log.info(
            "epoch %d: train loss %.3f acc %.3f | val loss %.3f acc %.4f | %.0f img/s",
            epoch + 1,
            stats["train_loss"],
            stats["train_acc"],
            val_loss,
            val_acc,
            stats["images_per_second"],
        )
        state.epoch = epoch + 1
        state.offer(val_acc, model)
        atomic_write_text(run.history, history_csv(history))
        checkpoint(run.resume_dir, asdict(cfg), state, model, optimizer, scheduler)
    train_seconds = time.perf_counter() - t0

    best = state.best
    assert state.best_model is not None
    model.load_state_dict(state.best_model)
    predict = dict(transform=eval_tf, device=device, batch_size=cfg.eval_batch_size, amp=cfg.amp)
    val_probs = predict_proba(model, val_images, **predict)
    test_probs = predict_proba(model, bundle.test.images, **predict)
    save_tensors(run.generalist_weights, model.state_dict(), {"architecture": cfg.model})
    plot_history(history, best["epoch"], run.curve)
    save_npy(run.val_probs, val_probs.astype(np.float32))
    save_npy(run.val_labels, bundle.val.labels)
    metrics = {
        "val_accuracy": float((val_probs.argmax(1) == bundle.val.labels).mean()),
        "test_accuracy": float((test_probs.argmax(1) == bundle.test.labels).mean()),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "train_seconds": round(train_seconds, 2),
        "n_train": len(bundle.train),
        "n_val": len(bundle.val),
        "n_test": len(bundle.test),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    gap = accuracy_gap_warning(
        metrics["val_accuracy"], len(bundle.val), metrics["test_accuracy"], len(bundle.test)
    )
    if gap:
        log.warning(gap)
        warnings.append(gap)
    if warnings:
        metrics["split_warnings"] = warnings
    record = GeneralistRecord(
        architecture=cfg.model,
        n_classes=bundle.n_classes,
        class_names=list(bundle.class_names),
        in_chans=bundle.channels,
        input_size=input_size,
        mean=mean,
        std=std,
        data=source.to_dict(),
        hflip=hflip,
        metrics=metrics,
        weights_sha256=file_sha256(run.generalist_weights),
        eval_batch_size=cfg.eval_batch_size,
        coarse=None if bundle.coarse is None else bundle.coarse.tolist(),
        coarse_names=bundle.coarse_names,
        versions=software_versions(),
    )
    save_json(
        run.generalist_record, record.to_dict()
    )  # written last: marks the generalist complete
    manifest.register(
        run.root,
        run.config,
        run.history,
        run.curve,
        run.generalist_weights,
        run.val_probs,
        run.val_labels,
        run.generalist_record,
    )
    shutil.rmtree(run.resume_dir, ignore_errors=True)
    return record

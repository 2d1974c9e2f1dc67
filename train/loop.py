"""Training as plain functions: batches, one epoch, evaluation, schedules, mixed precision, and
the per-epoch history (CSV and curve)."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from specialists.errors import SpecialistsError
from specialists.models import autocast_for
from specialists.storage import save_figure
from specialists.transforms import BatchTransform

__all__ = [
    "build_optimizer",
    "cosine_with_warmup",
    "history_csv",
    "keep_frozen_fixed",
    "plot_history",
    "shuffled_batches",
    "train_one_epoch",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def shuffled_batches(
    n: int, batch_size: int, rng: np.random.Generator, drop_last: bool = True
) -> list[np.ndarray]:
    """A seeded pass over ``n`` examples in batches (the last partial batch dropped by default)."""
    order = rng.permutation(n)
    stop = (n // batch_size) * batch_size if drop_last and n >= batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    raise SpecialistsError(f"unknown optimizer {name!r}; expected adamw or sgd")


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def keep_frozen_fixed(model: nn.Module) -> None:
    """Frozen layers stay as they are, statistics included: a module whose weights are all frozen
    (or, holding no weights, whose parent's are) and that keeps buffers (batch norm's running
    mean and variance) runs in eval mode. Without this a ``--trainable last`` specialist's frozen
    stages would drift from the generalist's, and could not be shared at inference."""

    def frozen(module: nn.Module, recurse: bool) -> bool:
        weights = list(module.parameters(recurse=recurse))
        return bool(weights) and not any(p.requires_grad for p in weights)

    for parent in model.modules():
        for child in parent.children():
            if next(child.buffers(recurse=False), None) is None:
                continue
            has_own = next(child.parameters(recurse=False), None) is not None
            if frozen(child, False) if has_own else frozen(parent, True):
                child.eval()


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batches: Iterable[np.ndarray],
    targets: Callable[[np.ndarray], torch.Tensor],
    transform: BatchTransform,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: LossFn,
    device: torch.device,
    amp: str = "auto",
    generator: torch.Generator | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``batches`` (index arrays into ``images``, uint8 (N, H, W, C) on CPU).

    ``targets(idx)`` gives the class labels of a batch; ``loss_fn(logits, labels, x)`` the loss
    (``x`` is the transformed input, for losses that need a teacher's view of it).
    """
    model.train()
    keep_frozen_fixed(model)
    autocast, dtype = autocast_for(device, amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    batches = list(batches)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, leave=False, disable=None if progress else True, unit="batch")
    for idx in bar:
        idx_t = torch.from_numpy(np.asarray(idx))
        x = transform(images[idx_t].to(device, non_blocking=True), generator)
        y = targets(idx).to(device, non_blocking=True)
        with autocast():
            logits = model(x)
            loss = loss_fn(logits.float(), y, x)
        if not torch.isfinite(loss):
            raise SpecialistsError(
                f"training diverged (loss {loss.item()}); lower the learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "images_per_second": seen / max(elapsed, 1e-9),
        "seconds": elapsed,
    }


def history_csv(rows: list[dict]) -> str:
    """One CSV row per epoch, columns in the order of the first row's keys."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_history(history: list[dict], best_epoch: int, path: Path) -> None:
    """The training curve: train and validation accuracy and loss by epoch, best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(ep, [100 * r["train_acc"] for r in history], label="train (augmented)")
    a1.plot(ep, [100 * r["val_acc"] for r in history], label="validation")
    a1.set_ylabel("accuracy (%)")
    a2.plot(ep, [r["train_loss"] for r in history], label="train (augmented)")
    a2.plot(ep, [r["val_loss"] for r in history], label="validation")
    a2.set_ylabel("cross-entropy")
    for ax in (a1, a2):
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    a1.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)

"""Training as plain functions: batches, one epoch, evaluation, schedules, mixed precision."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from specialists.errors import SpecialistsError
from specialists.transforms import BatchTransform

__all__ = [
    "autocast_for",
    "build_optimizer",
    "cosine_with_warmup",
    "predict_proba",
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


def autocast_for(device: torch.device, amp: str) -> tuple[Callable[[], object], torch.dtype | None]:
    """Autocast context factory and dtype: bf16 (or fp16) on CUDA, nothing on CPU."""
    if device.type != "cuda" or amp == "off":
        return nullcontext, None
    if amp == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        if dtype is None:
            raise SpecialistsError(f"--amp {amp}: expected auto, bf16, fp16 or off")
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype


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
    autocast, dtype = autocast_for(device, amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    batches = list(batches)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, leave=False, disable=not progress, unit="batch")
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


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    transform: BatchTransform,
    device: torch.device,
    batch_size: int = 512,
    amp: str = "auto",
    desc: str = "predict",
    progress: bool = False,
) -> np.ndarray:
    """Softmax probabilities (N, K) float32, in input order; deterministic on CPU."""
    model.eval()
    autocast, _ = autocast_for(device, amp)
    images = torch.as_tensor(images)
    out = []
    for start in tqdm(
        range(0, len(images), batch_size),
        desc=desc,
        leave=False,
        disable=not progress,
        unit="batch",
    ):
        x = transform(images[start : start + batch_size].to(device, non_blocking=True))
        with autocast():
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()

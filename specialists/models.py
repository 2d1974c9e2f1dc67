"""Building models from timm names, loading local checkpoints, choosing the device, and running a
plain model over images (``predict_proba``)."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import SpecialistsError
from .storage import load_tensors
from .transforms import BatchTransform

__all__ = [
    "autocast_for",
    "create_model",
    "get_classifier",
    "load_checkpoint_weights",
    "predict_proba",
    "resolve_device",
    "set_cpu_threads",
]

log = logging.getLogger(__name__)


def create_model(
    name: str, num_classes: int, in_chans: int = 3, input_size: int | None = None
) -> nn.Module:
    """A timm model by name, randomly initialised (never downloads weights)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise SpecialistsError(f"unknown timm model {name!r}{hint}")
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    if input_size is not None:
        try:  # transformers and other fixed-size models need to know the input size
            return timm.create_model(name, img_size=input_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, **kwargs)


def get_classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer (timm's ``get_classifier``), required to be an ``nn.Linear``."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise SpecialistsError(
            f"{type(model).__name__}: the classifier is {type(head).__name__}, not a linear layer; "
            "specialist heads need a timm model whose get_classifier() is nn.Linear"
        )
    return head


def classifier_name(model: nn.Module) -> str:
    """Dotted module name of the classifier, e.g. ``classifier`` or ``head.fc``."""
    head = get_classifier(model)
    return next(name for name, m in model.named_modules() if m is head)


def load_checkpoint_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A user's checkpoint: safetensors, or torch's format read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise SpecialistsError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise SpecialistsError(
            f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SpecialistsError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def apply_checkpoint(
    model: nn.Module, state: dict[str, torch.Tensor], path: str, reset_head: bool = False
) -> None:
    """Load ``state`` into ``model``; a class-count mismatch is a clear error unless
    ``reset_head`` (then the classifier keeps its fresh initialisation)."""
    own = model.state_dict()
    head_keys = {f"{name}.{p}" for name in [classifier_name(model)] for p in ("weight", "bias")}
    for k in head_keys:
        if k in state and state[k].shape != own[k].shape and not reset_head:
            raise SpecialistsError(
                f"{path}: checkpoint has {state[k].shape[0]} classes but the data has "
                f"{own[k].shape[0]} (use --reset-head to start a new classifier)"
            )
    if reset_head:
        state = {k: v for k, v in state.items() if k not in head_keys}
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise SpecialistsError(
            f"{path}: tensor {bad[0]!r} has shape {tuple(state[bad[0]].shape)}, model expects {tuple(own[bad[0]].shape)} (another architecture?)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_keys]
    if missing or unexpected:
        raise SpecialistsError(
            f"{path}: does not match the architecture ({len(missing)} missing, {len(unexpected)} unexpected tensors, "
            f"e.g. {(missing or unexpected)[0]!r})"
        )


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SpecialistsError(f"--device {device}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecialistsError(f"--device {device}: CUDA is not available on this machine")
    return dev


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_cpu_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: the cores this process may use)."""
    if threads is None or threads <= 0:
        threads = available_cores()
    torch.set_num_threads(threads)
    return threads


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
        disable=None if progress else True,
        unit="batch",
    ):
        x = transform(images[start : start + batch_size].to(device, non_blocking=True))
        with autocast():
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()

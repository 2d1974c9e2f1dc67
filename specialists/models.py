"""Building models from timm names, loading local checkpoints, choosing the device, and running a
plain model over images (``predict_proba``)."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import SpecialistsError
from .storage import load_json, load_tensors
from .transforms import BatchTransform

__all__ = [
    "autocast_for",
    "checkpoint_config",
    "create_model",
    "get_classifier",
    "load_checkpoint_weights",
    "model_from_checkpoint",
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


CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin")  # in a checkpoint folder


def _checkpoint_file(path: Path) -> Path:
    """The weights file of ``path``: itself, or in a folder (timm's / the Hugging Face hub's
    layout) ``model.safetensors`` or ``pytorch_model.bin``."""
    if path.is_dir():
        for name in CHECKPOINT_FILES:
            if (path / name).is_file():
                return path / name
        raise SpecialistsError(f"{path}: a folder without {' or '.join(CHECKPOINT_FILES)}")
    if not path.is_file():
        raise SpecialistsError(f"{path}: checkpoint not found")
    return path


def load_checkpoint_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A user's checkpoint (a file, or a folder holding one): safetensors, or torch's format
    read with ``weights_only=True``; wrappers (``state_dict``, ``model``, ``module.``) removed."""
    path = _checkpoint_file(Path(path).expanduser())
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


def checkpoint_config(path: str | os.PathLike) -> dict:
    """What a checkpoint says of its inputs, from the ``config.json`` beside it or in its folder
    (timm's ``pretrained_cfg``): ``mean``, ``std`` and ``input_size`` (its side) where given,
    else {}."""
    path = Path(path).expanduser()
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return {}
    data = load_json(config)
    cfg = data.get("pretrained_cfg", data) if isinstance(data, dict) else {}
    out: dict = {}
    try:
        if cfg.get("mean") is not None and cfg.get("std") is not None:
            out["mean"] = [float(v) for v in cfg["mean"]]
            out["std"] = [float(v) for v in cfg["std"]]
        if cfg.get("input_size") is not None:
            out["input_size"] = int(cfg["input_size"][-1])
    except (TypeError, ValueError, IndexError) as e:
        raise SpecialistsError(
            f"{config}: pretrained_cfg has a malformed mean, std or input_size"
        ) from e
    return out


def _names(value: str | Sequence[str] | None) -> list[str]:
    return [] if not value else [value] if isinstance(value, str) else list(value)


def model_from_checkpoint(
    name: str,
    num_classes: int,
    in_chans: int,
    input_size: int | None,
    path: str | os.PathLike,
    *,
    reset_head: bool = False,
) -> nn.Module:
    """A timm model started from a local checkpoint through timm's own pretrained loading: the
    state dict (read weights-only) is handed to ``timm.create_model(pretrained=True)``, which
    adapts the first convolution to ``in_chans`` input channels and starts a new classifier
    when the class count differs (or with ``reset_head``). A checkpoint of another
    architecture is one clear error."""
    state = load_checkpoint_weights(path)
    with torch.random.fork_rng(devices=[]):  # the template only names the layers: no seed used
        template = create_model(name, num_classes, in_chans, input_size)
    cfg = dict(getattr(template, "pretrained_cfg", None) or {})
    heads = _names(cfg.get("classifier")) or [classifier_name(template)]
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    convs = [c for c in _names(cfg.get("first_conv")) if f"{c}.weight" in state]
    own = template.state_dict()
    missing = [k for k in own if k not in state and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise SpecialistsError(
            f"{path}: does not match {name} ({len(missing)} missing, {len(unexpected)} unexpected "
            f"tensors, e.g. {(missing or unexpected)[0]!r}; another architecture?)"
        )
    adaptable = head_keys | {f"{c}.weight" for c in convs}
    bad = [k for k in state if k not in adaptable and state[k].shape != own[k].shape]
    if bad:
        raise SpecialistsError(
            f"{path}: tensor {bad[0]!r} has shape {tuple(state[bad[0]].shape)}, {name} expects "
            f"{tuple(own[bad[0]].shape)} (another architecture?)"
        )
    head_w = next(
        (state[k] for k in sorted(head_keys) if k.endswith(".weight") and k in state), None
    )
    ck_classes = num_classes if head_w is None else int(head_w.shape[0])
    ck_chans = int(state[f"{convs[0]}.weight"].shape[1]) if convs else in_chans
    new_head = reset_head or head_w is None or ck_classes != num_classes  # headless: a new one
    side = input_size or 224
    overlay = {
        "state_dict": state,
        "num_classes": -1 if new_head else num_classes,  # differs from ours: timm drops the head
        "input_size": (ck_chans, side, side),
        "classifier": heads[0] if len(heads) == 1 else tuple(heads),
        "first_conv": tuple(convs) if convs else None,
    }
    kwargs = {"num_classes": num_classes, "in_chans": in_chans}
    try:
        try:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, img_size=side, **kwargs
            )
        except TypeError:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
    except RuntimeError as e:
        raise SpecialistsError(f"{path}: does not fit {name} ({str(e).splitlines()[0]})") from e
    if new_head and ck_classes != num_classes:
        log.info(
            "%s: %d classes in the checkpoint, %d here: a new classifier",
            path,
            ck_classes,
            num_classes,
        )
    if ck_chans != in_chans:
        log.info(
            "%s: first convolution adapted from %d to %d input channels", path, ck_chans, in_chans
        )
    return model


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

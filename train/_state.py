"""Pickle-free training state (nested dicts split into safetensors tensors and JSON) and the
resume logic the epoch-based trainers share."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specialists.errors import SpecialistsError
from specialists.storage import load_json, load_tensors, save_json, save_tensors

_TENSOR = "__tensor__"


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [[_key(k), _split(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _key(k: Any) -> Any:
    return k if isinstance(k, (str, int)) else str(k)


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


# The layout inside a resume folder (``latest.json`` naming ``<tag>/state.*``) is private to this
# module: the run directory names the folder only.
def save_state(directory: Path, state: dict[str, Any], tag: str) -> None:
    """Write ``state`` into ``directory/tag/``, then point ``latest.json`` at it, then drop older
    states. A kill at any moment leaves ``latest.json`` naming a complete state (or none)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    save_tensors(directory / tag / "state.safetensors", tensors)
    save_json(directory / tag / "state.json", skeleton)
    save_json(directory / "latest.json", {"tag": tag})
    for old in directory.iterdir():
        if old.is_dir() and old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def load_state(directory: Path) -> dict[str, Any] | None:
    """The latest complete saved state, or None when there is none."""
    if not (directory / "latest.json").is_file():
        return None
    tag = load_json(directory / "latest.json")["tag"]
    tensors = load_tensors(directory / tag / "state.safetensors")
    return _join(load_json(directory / tag / "state.json"), tensors)


@dataclass
class Progress:
    """What a resumable training carries from one epoch to the next (besides the optimiser)."""

    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})
    best_model: dict[str, torch.Tensor] | None = None

    def offer(self, val_acc: float, model: nn.Module) -> None:
        """Keep ``model``'s weights if ``val_acc`` is the best so far (``epoch`` just finished)."""
        if val_acc > self.best["val_acc"]:
            self.best = {"val_acc": val_acc, "epoch": self.epoch}
            self.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def resume(
    directory: Path,
    key: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    other_key: str = "error",
) -> Progress:
    """The progress of an interrupted training saved in ``directory`` under the same ``key``
    (its configuration), with ``model``, ``optimizer`` and ``scheduler`` restored; a fresh start
    when there is none. A state saved under another key is an error (``other_key="error"``) or
    is ignored (``"restart"``)."""
    state = load_state(directory)
    if state is None:
        return Progress()
    if state.get("key") != key:
        if other_key == "error":
            raise SpecialistsError(
                f"{directory}: an interrupted training with another configuration is here; use another --out or delete it"
            )
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return Progress(state["epoch"], state["history"], state["best"], state["best_model"])


def checkpoint(
    directory: Path,
    key: Any,
    progress: Progress,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Save the state after epoch ``progress.epoch`` (a kill leaves this one or the previous)."""
    state = {
        "key": key,
        "epoch": progress.epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": progress.history,
        "best": progress.best,
        "best_model": progress.best_model,
    }
    save_state(directory, state, tag=f"epoch{progress.epoch:04d}")

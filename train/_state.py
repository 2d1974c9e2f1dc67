"""Pickle-free training state: nested dicts split into safetensors (tensors) and JSON (the rest)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

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

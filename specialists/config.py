"""Configuration files: YAML mapping onto a dataclass, with unknown keys and wrong types refused."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecialistsError
from .storage import atomic_write_text

__all__ = ["load_config_file", "merge_config", "write_config"]


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SpecialistsError(f"{path}: config file not found") from e
    except yaml.YAMLError as e:
        raise SpecialistsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecialistsError(f"{path}: expected a mapping of option: value")
    return data


def _check_type(name: str, value: Any, annotation: Any, source: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg, source)
            except SpecialistsError:
                continue
        raise SpecialistsError(
            f"{source}: {name}={value!r} has the wrong type (expected {annotation})"
        )
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and type(value) is annotation:
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return list(value)
    if annotation is dict and isinstance(value, dict):
        return value
    raise SpecialistsError(
        f"{source}: {name}={value!r} has the wrong type (expected {getattr(annotation, '__name__', annotation)})"
    )


def merge_config(cls: type, file_values: dict, overrides: dict, source: str = "config") -> Any:
    """``cls`` built from defaults < config-file values < command-line overrides (not None)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise SpecialistsError(
            f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})"
        )
    values = {k: _check_type(k, v, hints[k], source) for k, v in file_values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        name = str(e).split(" ", 1)[0]  # the checks name the setting first
        if overrides.get(name) is not None:  # it came from a flag: name the flag and its value
            raise SpecialistsError(f"--{name.replace('_', '-')} {overrides[name]}: {e}") from e
        raise SpecialistsError(f"{source}: {e}") from e


def write_config(path: str | Path, config: Any) -> None:
    atomic_write_text(
        path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)
    )

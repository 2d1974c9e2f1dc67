"""Configuration: YAML files mapping onto the configuration dataclasses (unknown keys and wrong
types refused), and command-line flags derived from the same dataclasses.

A file is either flat (one step's settings) or an *experiment*: the sections ``generalist``,
``cluster``, ``specialists`` and ``distill``, and optionally ``data`` (the generalist's data
source). Every step command reads its own section of an experiment, and ``specialists run``
reads them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecialistsError
from .storage import atomic_write_text

__all__ = [
    "SECTIONS",
    "add_config_flags",
    "config_yaml",
    "field_help",
    "load_config_file",
    "merge_config",
    "write_config",
]

SECTIONS = ("generalist", "cluster", "specialists", "distill")


def load_config_file(path: str | Path, section: str | None = None) -> dict:
    """The mapping in the YAML file ``path``; with ``section``, an experiment file's section of
    that name ({} when absent; a flat file is returned whole). An experiment's top-level
    ``data`` goes to the generalist's section unless that section names its own."""
    data = _read_yaml(path)
    if section is None or not is_experiment(data):
        return data
    unknown = sorted(set(data) - set(SECTIONS) - {"data"})
    if unknown:
        raise SpecialistsError(
            f"{path}: unknown section {unknown[0]!r} (an experiment has data, {', '.join(SECTIONS)})"
        )
    values = data.get(section) or {}
    if not isinstance(values, dict):
        raise SpecialistsError(f"{path}: section {section!r} must be a mapping of option: value")
    if section == "generalist" and "data" in data:
        values = {"data": data["data"], **values}
    return dict(values)


def is_experiment(data: dict) -> bool:
    """Whether a configuration mapping is an experiment (sections) rather than one step's."""
    return any(k in data for k in SECTIONS)


def _read_yaml(path: str | Path) -> dict:
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


def config_yaml(config: Any) -> str:
    """``config`` (a dataclass) as the YAML that ``--config`` reads back."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# flags from the dataclasses


def field_help(cls: type) -> dict[str, str]:
    """The comments of ``cls``'s fields in its source: the one at the end of a field's line and
    those on the lines just above it, joined."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    lines = source.splitlines()
    for i, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        above = []
        j = i - 1
        while j in comments and lines[j - 1].strip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        text = " ".join([*above, *([comments[i]] if i in comments else [])]).strip()
        if text:
            out.setdefault(name, text)
    return out


def _flag_type(annotation: Any) -> tuple[Any, dict]:
    """argparse keywords for a field's annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _flag_type(args[0])
        return None, {"type": yaml.safe_load, "metavar": "YAML"}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return annotation, {"type": annotation}
    return None, {"type": yaml.safe_load, "metavar": "YAML"}


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()
) -> None:
    """Give every field of the dataclass ``cls`` a flag ``--field-name`` (default None: the
    configuration file's value, else the field's default, which the help shows), unless the
    parser already has one for it; the hand-written flags of a command keep their wording and
    get the default added to their help. Lists and mappings take YAML (``--groups '{3: {...}}'``)."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    have = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        shown = (
            "none" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
        )
        shown = shown.removesuffix("...").strip()
        action = have.get(f.name)
        text = helps.get(f.name, f.name.replace("_", " "))
        if action is not None:
            if not action.help or action.help.startswith("default"):  # says only the default
                action.help = f"{text} ({action.help or f'default {shown}'})"
            elif "default" not in action.help:
                action.help = f"{action.help} (default {shown})"
            continue
        _, kwargs = _flag_type(hints[f.name])
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            help=f"{text} (default {shown})",
            **kwargs,
        )

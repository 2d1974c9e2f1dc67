"""A self-contained ensemble: written by ``specialists export RUN OUT``, read back by
``Ensemble.from_pretrained(OUT)`` without the run directory.

The folder holds::

    ensemble.json                  format, the generalist's record (classes, input size, mean and
                                   std), the consulted specialists' records (groups, input sizes,
                                   logit offsets), the combination, and the sha256 of every file
    generalist.safetensors
    specialist-<id>.safetensors    one per specialist the combination keeps
    onnx/<member>.onnx             with ``--onnx``: each member alone, checked with onnxruntime

The weights are the run's files byte for byte (each record's checksum still holds). The folder is
written under a temporary name and renamed into place: a killed export leaves no half folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._version import software_versions
from .artifacts import load_weights
from .combination import Combination
from .errors import SpecialistsError
from .models import create_model
from .records import GeneralistRecord, SpecialistRecord
from .storage import file_sha256, load_json, save_json

__all__ = ["FORMAT", "ExportedParts", "check_onnx", "is_export", "read_export", "write_export"]

FORMAT = "specialists-ensemble"
FORMAT_VERSION = 1
MANIFEST = "ensemble.json"
GENERALIST = "generalist.safetensors"
ONNX_TOLERANCE = 1e-4


def specialist_file(sid: int) -> str:
    return f"specialist-{sid}.safetensors"


@dataclass
class ExportedParts:
    """What an exported folder holds, checked and rebuilt (the generalist on ``device``)."""

    generalist: nn.Module
    record: GeneralistRecord
    specialists: list[SpecialistRecord]
    generalist_weights: Path
    specialist_weights: dict[int, Path]
    combination: Combination


def is_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an exported ensemble (a run directory does not)."""
    path = Path(folder) / MANIFEST
    if not (Path(folder) / GENERALIST).is_file() or not path.is_file():
        return False
    try:
        return load_json(path).get("format") == FORMAT
    except (SpecialistsError, AttributeError):
        return False


def read_export(folder: str | os.PathLike, device: torch.device) -> ExportedParts:
    """Read and check an exported ensemble: the format, every file against its checksum, every
    record; the generalist is built and loaded (the specialists on first use)."""
    folder = Path(folder)
    meta_path = folder / MANIFEST
    if not meta_path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST}"
        raise SpecialistsError(
            f"{folder}: {what}; not an exported ensemble (make one with `specialists export RUN {folder}`)"
        )
    meta = load_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SpecialistsError(f"{meta_path}: not a {FORMAT} file")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise SpecialistsError(
            f"{meta_path}: format version {meta.get('format_version')} is newer than this "
            f"program's ({FORMAT_VERSION}); upgrade specialists"
        )
    try:
        files: dict[str, str] = dict(meta["files"])
        record = GeneralistRecord.from_dict(meta["generalist"], f"{meta_path} (generalist)")
        specs = [
            SpecialistRecord.from_dict(d, f"{meta_path} (specialist {i})")
            for i, d in enumerate(meta["specialists"])
        ]
        combination = Combination.from_dict(meta["combination"], meta_path)
    except (KeyError, TypeError) as e:
        raise SpecialistsError(f"{meta_path}: incomplete ({e})") from e
    expected = {GENERALIST: record.weights_sha256}
    expected.update({specialist_file(s.id): s.weights_sha256 for s in specs})
    for name, sha in expected.items():
        path = folder / name
        if files.get(name) != sha:
            raise SpecialistsError(
                f"{meta_path}: lists no checksum for {name} that fits its record"
            )
        if not path.is_file():
            raise SpecialistsError(f"{path}: missing from the exported ensemble")
        if file_sha256(path) != sha:
            raise SpecialistsError(f"{path}: checksum does not match {meta_path} (file changed)")
    generalist = create_model(
        record.architecture, record.n_classes, record.in_chans, record.input_size
    )
    load_weights(generalist, folder / GENERALIST, record.architecture)
    return ExportedParts(
        generalist.to(device).eval(),
        record,
        specs,
        folder / GENERALIST,
        {s.id: folder / specialist_file(s.id) for s in specs},
        combination,
    )


def write_export(
    ensemble: Any,
    out: str | os.PathLike,
    *,
    onnx: bool = False,
    force: bool = False,
    source: str = "",
) -> dict:
    """Write ``ensemble`` (an :class:`~specialists.ensemble.Ensemble`) to ``out``; returns the
    JSON written. An existing
    ``out`` is replaced only with ``force``."""
    out = Path(out)
    if ensemble.run is not None:
        run_root = Path(ensemble.run.root).resolve()
        target = out.resolve()
        if target == run_root or run_root in target.parents or target in run_root.parents:
            raise SpecialistsError(
                f"{out}: inside (or around) the run {run_root}; export elsewhere"
            )
    if out.exists() and not force:
        raise SpecialistsError(f"{out}: already exists (give --force to replace it)")
    if out.exists() and not is_export(out):  # a run directory has an ensemble.json too
        raise SpecialistsError(f"{out}: exists and is not an exported ensemble; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        rec: GeneralistRecord = ensemble.record
        specs: list[SpecialistRecord] = ensemble.specialists
        files = {
            GENERALIST: _copy(ensemble.generalist_weights, tmp / GENERALIST, rec.weights_sha256)
        }
        for s in specs:
            name = specialist_file(s.id)
            files[name] = _copy(ensemble.specialist_weights[s.id], tmp / name, s.weights_sha256)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "input_size": ensemble.input_size,
            "transform": {
                "mean": rec.mean,
                "std": rec.std,
                "resize": "bilinear, antialiased, to each member's input_size",
            },
            "generalist": rec.to_dict(),
            "specialists": [s.to_dict() for s in specs],
            "combination": ensemble.combination.to_dict(),
            "files": files,
            "source": source,
            "versions": software_versions(),
        }
        if onnx:
            meta["onnx"] = export_onnx(ensemble, tmp / "onnx")
        save_json(tmp / MANIFEST, meta)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _copy(src: Path, dst: Path, sha256: str) -> str:
    """Copy ``src`` to ``dst``, checking its checksum on the copy."""
    shutil.copyfile(src, dst)
    if file_sha256(dst) != sha256:
        raise SpecialistsError(f"{src}: checksum does not match its record (file changed)")
    return sha256


def _members(ensemble: Any) -> list[tuple[str, nn.Module, int]]:
    """(name, model, input size) of every member of ``ensemble``."""
    rec = ensemble.record
    out = [("generalist", ensemble.generalist, rec.input_size)]
    for s in ensemble.specialists:
        out.append((f"specialist-{s.id}", ensemble.load_specialist(s), s.size(rec)))
    return out


def export_onnx(ensemble: Any, folder: Path) -> dict:
    """Each member of ``ensemble`` as ``folder/<member>.onnx`` (float32 input (B, C, S, S),
    normalised; output the member's logits), each checked with onnxruntime against PyTorch on
    the same random inputs. Returns {member: {"file", "input_size", "max_abs_diff"}}."""
    try:
        import onnxruntime  # noqa: F401  (checked here: the export is useless without it)
    except ImportError as e:
        raise SpecialistsError(
            "--onnx needs onnx, onnxscript and onnxruntime (pip install 'specialists[onnx]')"
        ) from e
    folder.mkdir(parents=True, exist_ok=True)
    device = ensemble.device
    try:
        return _export_members(ensemble, folder)
    finally:
        ensemble.to(device)  # members exported on the CPU go back where they were


def _export_members(ensemble: Any, folder: Path) -> dict:
    report = {}
    for name, model, size in _members(ensemble):
        model = model.to("cpu").eval()
        path = folder / f"{name}.onnx"
        example = torch.randn(2, ensemble.record.in_chans, size, size)
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # the exporters raise many types; the message is what matters
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecialistsError(
                f"{name} ({getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)}): "
                f"cannot be exported to ONNX ({first})"
            ) from e
        diff = check_onnx(model, path, ensemble.record.in_chans, size)
        report[name] = {"file": f"onnx/{path.name}", "input_size": size, "max_abs_diff": diff}
    return report


def check_onnx(model: nn.Module, path: Path, in_chans: int, size: int, batch: int = 8) -> float:
    """Max abs difference of ``path`` run by onnxruntime and ``model`` on the same seeded
    random inputs; above ``ONNX_TOLERANCE`` is an error."""
    import onnxruntime as ort

    x = torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x).float().numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if not diff <= ONNX_TOLERANCE:
        raise SpecialistsError(
            f"{path}: onnxruntime differs from PyTorch by {diff:.2e} (more than {ONNX_TOLERANCE:g})"
        )
    return diff

"""Prediction at scale: files and folders in, one row per image out (CSV or JSON lines).

Images are listed (folders recursively), decoded by a pool of threads one batch ahead of the
model, and written as they come; a file that cannot be read is reported and skipped, never
fatal. The output is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .decode import decode_workers
from .errors import SpecialistsError
from .image_files import read_image
from .sources import IMAGE_EXTENSIONS
from .storage import atomic_path

__all__ = ["PredictSummary", "list_images", "predict_files"]

log = logging.getLogger(__name__)

# uint8 images (N, S, S, C) -> (probabilities (N, K), consulted specialist ids per image)
Predictor = Callable[[np.ndarray], tuple[np.ndarray, list[list[int]]]]


@dataclass
class PredictSummary:
    n_images: int = 0  # predicted
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named and the images below the folders named (recursively, sorted, hidden
    files and other extensions skipped); a path that does not exist is an error."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(
                f
                for f in sorted(p.rglob("*"))
                if f.is_file()
                and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            raise SpecialistsError(f"{p}: no such file or folder")
    return out


def _decode(path: Path, size: int, channels: int, resize: str) -> np.ndarray | str:
    try:
        return read_image(path, size, channels, resize)
    except SpecialistsError as e:
        return str(e).removeprefix(f"{path}: ")


def _batches(
    files: list[Path],
    size: int,
    channels: int,
    resize: str,
    batch_size: int,
    pool: ThreadPoolExecutor,
) -> Iterator[list[tuple[Path, np.ndarray | str]]]:
    """Decoded batches in order, the next one decoding while the caller uses this one."""

    def submit(start: int) -> list[Future]:
        chunk = files[start : start + batch_size]
        return [pool.submit(_decode, f, size, channels, resize) for f in chunk]

    pending = submit(0) if files else []
    for start in range(0, len(files), batch_size):
        current = pending
        pending = submit(start + batch_size) if start + batch_size < len(files) else []
        yield list(zip(files[start : start + batch_size], (f.result() for f in current)))


def predict_files(
    predict: Predictor,
    files: list[Path],
    *,
    size: int,
    channels: int,
    class_names: list[str],
    resize: str = "crop",
    top_k: int = 5,
    batch_size: int = 256,
    output: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = log.warning,
    label: str | None = None,
) -> PredictSummary:
    """Predict every file of ``files`` (read at ``size`` px, ``channels`` channels, resized
    as ``resize`` says: the run's training data's way) and write
    one row each to ``output`` (``.csv`` or ``.jsonl``), or print a short block each with
    ``output=None`` (through ``echo``). Each unreadable file is one line through ``warn`` and
    listed in the summary; none readable is an error, and no output file is left. ``label``
    names what answered in printed blocks (default: the specialists consulted)."""
    if top_k < 1:
        raise SpecialistsError(f"--top-k {top_k}: must be >= 1")
    if batch_size < 1:
        raise SpecialistsError(f"--batch-size {batch_size}: must be >= 1")
    if workers is not None and workers < 1:
        raise SpecialistsError(f"--workers {workers}: must be >= 1")
    top_k = min(top_k, len(class_names))
    kind = None
    if output is not None:
        kind = Path(output).suffix.lower()
        if kind not in (".csv", ".jsonl"):
            raise SpecialistsError(f"{output}: the output must end in .csv or .jsonl")
    summary = PredictSummary()
    workers = workers or decode_workers()

    def run(writer: _RowWriter | None) -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            bar = tqdm(
                total=len(files), desc="predict", unit="image", disable=None if progress else True
            )
            for batch in _batches(files, size, channels, resize, batch_size, pool):
                good = [(p, x) for p, x in batch if isinstance(x, np.ndarray)]
                for p, why in batch:
                    if isinstance(why, str):
                        summary.failures.append((str(p), why))
                        warn(f"{p}: skipped ({why})")
                if good:
                    probs, consulted = predict(np.stack([x for _, x in good]))
                    for (p, _), q, c in zip(good, probs, consulted):
                        top = np.argsort(-q, kind="stable")[:top_k]
                        row = [(class_names[i], float(q[i])) for i in top]
                        if writer is None:
                            _echo(echo, str(p), row, c, label)
                        else:
                            writer.write(str(p), row, c)
                    summary.n_images += len(good)
                bar.update(len(batch))
            bar.close()
        if summary.n_images == 0:  # raised inside the output's `with`: no file is left
            raise SpecialistsError(f"no readable image among {len(files)} file(s)")

    if output is None:
        run(None)
    else:
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            run(_RowWriter(f, kind or ".csv", top_k))
    return summary


def _echo(
    echo: Callable[[str], None], path: str, row, consulted: list[int], label: str | None
) -> None:
    note = label or "consulted specialist(s): " + (
        ", ".join(f"#{i}" for i in consulted) if consulted else "none (generalist only)"
    )
    echo(f"{path}  [{note}]")
    for name, prob in row:
        echo(f"  {prob:7.4f}  {name}")


class _RowWriter:
    """One row per image: CSV (path, class_k and prob_k for k = 1..top_k, the consulted
    specialists separated by spaces) or JSON lines ({path, top: [{class, prob}], consulted})."""

    def __init__(self, file: io.TextIOBase, kind: str, top_k: int) -> None:
        self.file, self.kind = file, kind
        if kind == ".csv":
            self._csv = csv.writer(file)
            header = ["path"]
            for k in range(1, top_k + 1):
                header += [f"class_{k}", f"prob_{k}"]
            self._csv.writerow([*header, "consulted"])

    def write(self, path: str, row: list[tuple[str, float]], consulted: list[int]) -> None:
        if self.kind == ".csv":
            cells: list[object] = [path]
            for name, prob in row:
                cells += [name, f"{prob:.6f}"]
            self._csv.writerow([*cells, " ".join(map(str, consulted))])
        else:
            top = [{"class": name, "prob": round(prob, 6)} for name, prob in row]
            rec = {"path": path, "top": top, "consulted": consulted}
            self.file.write(json.dumps(rec, ensure_ascii=False) + "\n")

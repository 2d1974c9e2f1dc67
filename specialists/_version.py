"""The project's version, and the versions of what a result was made with."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def software_versions() -> dict:
    """What every record keeps of the software that made it: this project (and its git revision
    when it runs from a checkout, ``-dirty`` with uncommitted changes), Python, torch, CUDA,
    timm, faiss and numpy."""
    import faiss
    import numpy
    import timm
    import torch

    return {
        "specialists": __version__,
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": timm.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "numpy": numpy.__version__,
    }


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None  # installed from a wheel or an archive
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")

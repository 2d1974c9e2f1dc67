"""The ``RUN/clusters.json`` report: what was clustered, how, the groups, and how good they are."""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np

from .choose import GroupingChoice
from .estimator import ConfusionClustering
from .metrics import coarse_agreement, confusion_captured, group_stats, random_split_baseline

__all__ = ["REPORT_VERSION", "build_report"]

REPORT_VERSION = 1


def build_report(
    matrix: np.ndarray,
    model: ConfusionClustering,
    *,
    matrix_kind: Literal["covariance", "confusion", "second moment"] = "covariance",
    class_names: list[str] | None = None,
    coarse: np.ndarray | None = None,
    confusion: np.ndarray | None = None,
    choice: GroupingChoice | None = None,
    baseline_repeats: int = 5,
    random_state: int = 0,
) -> dict:
    """JSON-ready dict for ``clusters.json`` (plain Python types only).

    ``matrix`` is the one the model was fitted on; ``confusion`` (counts, rows = true class) adds
    the generalist's accuracy per group; ``coarse`` (one id per class) adds ARI/NMI.
    """
    k = model.n_classes_
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} entries for {k} classes")
    groups = model.groups_
    stats = group_stats(matrix, groups, confusion)
    captured = confusion_captured(matrix, groups)
    base_mean, base_std = random_split_baseline(
        matrix, groups, n_repeats=baseline_repeats, random_state=random_state
    )
    quality: dict = {
        "confusion_captured": captured,
        "random_baseline": base_mean,
        "random_baseline_std": base_std,
        "lift": captured / base_mean if base_mean > 0 else None,
    }
    if coarse is not None:
        quality.update(coarse_agreement(groups, coarse))
    coverage = model.coverage_
    return {
        "version": REPORT_VERSION,
        "matrix": matrix_kind,
        "n_classes": k,
        "method": {
            "estimator": type(model).__name__,
            "params": {p: _plain(v) for p, v in model.get_params().items()},
            "n_features": int(model.n_features_),
            "sketched": bool(model.sketched_),
            "inertia": float(model.inertia_),
        },
        "choice": None if choice is None else choice.to_dict(),
        "class_names": names,
        "groups": [
            {"rank": r, "classes": g, "names": [names[c] for c in g], **_plain(s)}
            for r, (g, s) in enumerate(zip(groups, stats))
        ],
        "coverage": {
            "covered": int((coverage > 0).sum()),
            "uncovered": int((coverage == 0).sum()),
            "max": int(coverage.max()),
            "classes_by_count": {str(c): n for c, n in sorted(Counter(coverage.tolist()).items())},
        },
        "quality": _plain(quality),
    }


def _plain(v):
    """Numpy scalars/arrays to Python; anything else not JSON-native to its repr."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)

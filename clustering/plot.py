"""A picture of the grouping: the matrix with classes reordered by group, boundaries drawn."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from ._validate import check_groups, check_matrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["grouped_matrix_figure", "grouped_order"]


def grouped_order(
    groups: list, n_classes: int, max_classes: int | None = None
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Class order for display and the [start, end) block of each group in it.

    Each class appears once, in the best-ranked group holding it (later overlapping groups show
    only their remaining classes); classes in no group come last, unboxed. Above ``max_classes``
    the uncovered classes are left out first, then every block is thinned evenly.
    """
    seen = np.zeros(n_classes, dtype=bool)
    parts = []
    for g in check_groups(groups, n_classes):
        new = g[~seen[g]]
        seen[new] = True
        parts.append(new)
    rest = np.flatnonzero(~seen)
    n_cov = sum(len(p) for p in parts)
    if max_classes is not None and n_cov + len(rest) > max_classes:
        rest = rest[: max(0, max_classes - n_cov)]
        if n_cov > max_classes:
            frac = max_classes / n_cov
            parts = [
                p[np.linspace(0, len(p) - 1, max(1, int(len(p) * frac))).astype(int)]
                if len(p)
                else p
                for p in parts
            ]
    blocks, start = [], 0
    for p in parts:
        blocks.append((start, start + len(p)))
        start += len(p)
    order = np.concatenate([*parts, rest]).astype(np.int64)
    return order, blocks


def grouped_matrix_figure(
    matrix: np.ndarray,
    groups: list,
    *,
    class_names: list[str] | None = None,
    max_classes: int = 1500,
    title: str | None = None,
) -> Figure:
    """A figure of ``matrix`` reordered by group, with a box around each group (the caller saves
    it; this package writes no files).

    The diagonal is blanked (it would set the colour scale) and the scale is clipped at the 99th
    percentile of the off-diagonal. A scipy.sparse matrix is read for the classes shown only.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    m = check_matrix(matrix)
    k = m.shape[0]
    order, blocks = grouped_order(groups, k, max_classes)
    if sparse.issparse(m):
        sub = m[order][:, order].toarray().astype(np.float64)
    else:
        sub = m[np.ix_(order, order)].astype(np.float64)
    np.fill_diagonal(sub, np.nan)
    off = sub[np.isfinite(sub)]
    vmax = float(np.percentile(np.abs(off), 99)) if off.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    signed = off.size and off.min() < 0
    fig = Figure(figsize=(8, 7.2), dpi=150)
    ax = fig.add_subplot()
    im = ax.imshow(
        sub,
        cmap="RdBu_r" if signed else "viridis",
        vmin=-vmax if signed else 0.0,
        vmax=vmax,
        interpolation="nearest",
    )
    for a, b in blocks:
        if b > a:
            ax.add_patch(Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, lw=0.8, ec="k"))
    if class_names is not None and len(order) <= 60:
        labels = [str(class_names[c]) for c in order]
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(order)), labels, fontsize=5)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    shown = f"{len(order)} of {k} classes" if len(order) < k else f"{k} classes"
    ax.set_title(title or f"{len(blocks)} groups, {shown}, ordered by group", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig

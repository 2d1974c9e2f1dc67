"""Confusion clusters: which classes does the generalist confuse, and how to group them.

Pure numerics on prediction matrices (no model code): streaming covariance / confusion
statistics (dense, or sparse top-k second moments for very many classes), a scikit-learn style
clustering estimator (faiss k-means or spectral), a default chooser, quality metrics, the
``clusters.json`` report and a picture. This package writes no
files and imports nothing else of the project: it is the bottom layer (see docs/design.md).
"""

from .choose import GroupingChoice, choose_grouping
from .estimator import ConfusionClustering
from .metrics import (
    coarse_agreement,
    confusion_captured,
    confusion_mass,
    expected_random_captured,
    group_labels,
    group_stats,
    random_split_baseline,
)
from .plot import grouped_matrix_figure, grouped_order
from .report import REPORT_VERSION, build_report
from .sparse import TopKStats, dense_fits
from .stats import PredictionStats, prediction_stats
from .synthetic import planted_covariance, planted_groups, planted_predictions, planted_topk

__all__ = [
    "REPORT_VERSION",
    "ConfusionClustering",
    "GroupingChoice",
    "PredictionStats",
    "TopKStats",
    "build_report",
    "choose_grouping",
    "coarse_agreement",
    "confusion_captured",
    "confusion_mass",
    "dense_fits",
    "expected_random_captured",
    "group_labels",
    "group_stats",
    "grouped_matrix_figure",
    "grouped_order",
    "planted_covariance",
    "planted_groups",
    "planted_predictions",
    "planted_topk",
    "prediction_stats",
    "random_split_baseline",
]

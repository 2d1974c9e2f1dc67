"""Confusion clusters: which classes does the generalist confuse, and how to group them.

Pure numerics on prediction matrices (no model code): streaming covariance / confusion
statistics, a scikit-learn style clustering estimator (faiss k-means or spectral), a default
chooser, quality metrics, the ``clusters.json`` report and a picture. This package writes no
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
from .stats import PredictionStats, prediction_stats
from .synthetic import planted_covariance, planted_groups, planted_predictions

__all__ = [
    "REPORT_VERSION",
    "ConfusionClustering",
    "GroupingChoice",
    "PredictionStats",
    "build_report",
    "choose_grouping",
    "coarse_agreement",
    "confusion_captured",
    "confusion_mass",
    "expected_random_captured",
    "group_labels",
    "group_stats",
    "grouped_matrix_figure",
    "grouped_order",
    "planted_covariance",
    "planted_groups",
    "planted_predictions",
    "prediction_stats",
    "random_split_baseline",
]

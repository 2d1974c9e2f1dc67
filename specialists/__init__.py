"""specialists: specialist-ensemble image classification (Hinton, Vinyals & Dean 2015, section 5).

A generalist over all classes, confusion clusters of the classes it mixes up, one specialist per
cluster with a dustbin class, and a KL combiner that fuses them at inference. The names below are
the Python API; they come from three layers, each importing only those below it:
``specialists.clustering`` (numerics on prediction matrices) < the core modules of this package
(data, models, run directory, gating, combiner, ensemble, evaluation, calibration) <
``specialists.train`` (training jobs, launchers, controls, the pipeline) < ``specialists.cli``.
This file re-exports from all of them, lazily, and nothing imports it back.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

if TYPE_CHECKING:
    from .artifacts import load_generalist, load_student
    from .calibrate import calibrate_run
    from .combination import Combination
    from .combiner import combine, objective, solve_em
    from .data import ArraySplit, DataBundle, DataSource
    from .datasets import bundle_from_datasets, load_run_data
    from .ensemble import Ensemble, EnsembleOutput
    from .errors import SpecialistsError
    from .evaluate import evaluate_run
    from .gating import ActivePairs, GroupIndex, gate
    from .grouping import ClusterConfig, cluster_run
    from .records import FinetuneRecord, GeneralistRecord, SpecialistRecord
    from .run import RunDir
    from .sources import load_data, parse_source
    from .train import (
        DistillConfig,
        GeneralistConfig,
        SpecialistConfig,
        evaluate_controls,
        run_controls,
        run_demo,
        run_distill,
        train_generalist,
        train_specialists,
    )

# Public name -> the module that defines it. Loaded on first use, so that importing one module of
# the package (the command line, a worker process) does not load all of them.
_EXPORTS = {
    **dict.fromkeys(["load_generalist", "load_student"], "artifacts"),
    **dict.fromkeys(["calibrate_run"], "calibrate"),
    **dict.fromkeys(["Combination"], "combination"),
    **dict.fromkeys(["combine", "objective", "solve_em"], "combiner"),
    **dict.fromkeys(["ArraySplit", "DataBundle", "DataSource"], "data"),
    **dict.fromkeys(["bundle_from_datasets", "load_run_data"], "datasets"),
    **dict.fromkeys(["Ensemble", "EnsembleOutput"], "ensemble"),
    **dict.fromkeys(["SpecialistsError"], "errors"),
    **dict.fromkeys(["evaluate_run"], "evaluate"),
    **dict.fromkeys(["ActivePairs", "GroupIndex", "gate"], "gating"),
    **dict.fromkeys(["ClusterConfig", "cluster_run"], "grouping"),
    **dict.fromkeys(["FinetuneRecord", "GeneralistRecord", "SpecialistRecord"], "records"),
    **dict.fromkeys(["RunDir"], "run"),
    **dict.fromkeys(["load_data", "parse_source"], "sources"),
    **dict.fromkeys(
        [
            "DistillConfig",
            "GeneralistConfig",
            "SpecialistConfig",
            "evaluate_controls",
            "run_controls",
            "run_demo",
            "run_distill",
            "train_generalist",
            "train_specialists",
        ],
        "train",
    ),
}

__all__ = [
    "__version__",
    "ActivePairs",
    "ArraySplit",
    "ClusterConfig",
    "Combination",
    "DataBundle",
    "DataSource",
    "DistillConfig",
    "Ensemble",
    "EnsembleOutput",
    "FinetuneRecord",
    "GeneralistConfig",
    "GeneralistRecord",
    "GroupIndex",
    "RunDir",
    "SpecialistConfig",
    "SpecialistRecord",
    "SpecialistsError",
    "bundle_from_datasets",
    "calibrate_run",
    "cluster_run",
    "combine",
    "evaluate_controls",
    "evaluate_run",
    "gate",
    "load_data",
    "load_generalist",
    "load_run_data",
    "load_student",
    "objective",
    "parse_source",
    "run_controls",
    "run_demo",
    "run_distill",
    "solve_em",
    "train_generalist",
    "train_specialists",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

"""Training: the generalist, the specialists and the controls' jobs, the launchers, the pipeline.

Installed as ``specialists.train``. It builds on the core (:mod:`specialists`) and the core never
imports it; the command line (:mod:`specialists.cli`) sits on top.
"""

from .controls import evaluate_controls, run_controls
from .distill import DistillConfig, run_distill
from .generalist import GeneralistConfig, train_generalist
from .launch import Job, JobResult, run_jobs
from .pipeline import run_demo, train_specialists
from .specialist import SpecialistConfig, specialist_job, train_specialist

__all__ = [
    "DistillConfig",
    "GeneralistConfig",
    "Job",
    "JobResult",
    "SpecialistConfig",
    "evaluate_controls",
    "run_controls",
    "run_demo",
    "run_distill",
    "run_jobs",
    "specialist_job",
    "train_generalist",
    "train_specialist",
    "train_specialists",
]

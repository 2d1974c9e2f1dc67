"""specialists: specialist-ensemble image classification (Hinton, Vinyals & Dean 2015, section 5).

A generalist over all classes, confusion clusters of the classes it mixes up, one specialist per
cluster with a dustbin class, and a KL combiner that fuses them at inference.
"""

from .combiner import ActivePairs, GroupIndex, combine, gate, objective, solve_em, solve_gd
from .errors import SpecialistsError
from .records import GeneralistRecord
from .run import RunDir

__version__ = "0.1.0"

__all__ = [
    "ActivePairs",
    "GeneralistRecord",
    "GroupIndex",
    "RunDir",
    "SpecialistsError",
    "__version__",
    "combine",
    "gate",
    "objective",
    "solve_em",
    "solve_gd",
]

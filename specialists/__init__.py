"""specialists: specialist-ensemble image classification (Hinton, Vinyals & Dean 2015, section 5).

A generalist over all classes, confusion clusters of the classes it mixes up, one specialist per
cluster with a dustbin class, and a KL combiner that fuses them at inference.
"""

from .errors import SpecialistsError
from .records import GeneralistRecord
from .run import RunDir

__version__ = "0.1.0"

__all__ = ["GeneralistRecord", "RunDir", "SpecialistsError", "__version__"]

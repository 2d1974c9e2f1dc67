"""Data sources, training loops, and generalist and specialist training."""

from .data import ArraySplit, DataBundle, DataSpec, load_data, parse_data_spec
from .generalist import GeneralistConfig, load_generalist, train_generalist
from .synthetic import SyntheticConfig, generate_split

__all__ = [
    "ArraySplit",
    "DataBundle",
    "DataSpec",
    "GeneralistConfig",
    "SyntheticConfig",
    "generate_split",
    "load_data",
    "load_generalist",
    "parse_data_spec",
    "train_generalist",
]

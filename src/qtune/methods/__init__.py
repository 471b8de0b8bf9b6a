"""Pruning methods: what a training step keeps of its batch, one file per method. One registry
(`METHODS`, `register`, `build_method`) serves the CLI, the config files and the benchmarks;
the contract is in `qtune.methods.base`."""

from .base import (
    METHODS,
    SCORES,
    DatasetSelection,
    Decision,
    Method,
    Selection,
    build_method,
    register,
    response_mask_of,
    split_rows,
)
from .full import FullData
from .qtuning import QTuning
from .random import RandomPruning

__all__ = [
    "METHODS", "SCORES", "DatasetSelection", "Decision", "FullData", "Method", "QTuning", "RandomPruning",
    "Selection", "build_method", "register", "response_mask_of", "split_rows",
]

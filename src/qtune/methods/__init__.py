"""Pruning methods: what a training step keeps of its batch, one file per method, and the controls
of experiments (`oracle.py`, `token_matched.py`). One registry (`METHODS`, `register`,
`build_method`) serves the CLI, the config files and the benchmarks; the contract is in
`qtune.methods.base`."""

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
from .oracle import AntiOracle, Oracle, OracleRatio
from .qtuning import QTuning
from .random import RandomPruning
from .token_matched import TokenMatchedRandom

__all__ = [
    "METHODS", "SCORES", "AntiOracle", "DatasetSelection", "Decision", "FullData", "Method", "Oracle", "OracleRatio",
    "QTuning", "RandomPruning", "Selection", "TokenMatchedRandom", "build_method", "register", "response_mask_of",
    "split_rows",
]

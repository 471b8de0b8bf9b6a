"""Pruning methods: what a training step keeps of its batch, one file per method, and the controls
of experiments (`oracle.py`, `token_matched.py`). One registry (`METHODS`, `register`,
`build_method`) serves the CLI, the config files and the benchmarks; the contract is in
`qtune.methods.base`. The per-batch baselines of the Q-Tuning paper are sample rules and token
rules, one file per rule family, that `build_method` combines by name, "SAMPLE+TOKEN"
(`rules.py`: `longest+perplexity`, `entropy+random`, `infobatch+all`)."""

from . import (  # noqa: F401 (register rules)
    entropy, infobatch, length, perplexity, random_rules, rho1, token_attention, token_cleaning, token_perplexity, uds)
from .base import (
    METHODS,
    SCORES,
    DatasetSelection,
    Decision,
    Method,
    Selection,
    TokenMasks,
    register,
    response_mask_of,
    split_rows,
)
from .build import build_method, method_class
from .full import FullData
from .oracle import AntiOracle, Oracle, OracleRatio
from .qtuning import QTuning
from .random import RandomPruning
from .rules import SAMPLE_RULES, TOKEN_RULES, ComposedMethod, register_sample_rule, register_token_rule
from .token_matched import TokenMatchedRandom

__all__ = [
    "METHODS", "SAMPLE_RULES", "SCORES", "TOKEN_RULES", "AntiOracle", "ComposedMethod", "DatasetSelection",
    "Decision", "FullData", "Method", "Oracle", "OracleRatio", "QTuning", "RandomPruning", "Selection",
    "TokenMasks", "TokenMatchedRandom", "build_method", "method_class", "register", "register_sample_rule",
    "register_token_rule", "response_mask_of", "split_rows",
]

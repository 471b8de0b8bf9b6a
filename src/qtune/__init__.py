"""qtune: data-efficient supervised fine-tuning with Q-Tuning.

The two stages of Q-Tuning are pure functions on tensors, usable in any training loop:

    decision = qtune.triage(ppl, ent, r_sample=0.25)           # Stage 1: which samples to keep
    mask = qtune.prune_tokens(tokppl, response_mask, r_token=0.7,
                              rows=decision.prune_tokens)       # Stage 2: which tokens keep loss

`qtune.score_batch` computes the scores they need with a gradient-free pass of a model.
"""

# Registering the built-in pruning methods and static selectors fills the name sets that the
# options are checked against (config.METHOD_NAMES, config.SELECTOR_NAMES).
from . import methods, selectors  # noqa: F401
from .errors import DataError, QTuneError
from .pruning import TriageResult, prune_tokens, token_perplexity, token_scores, triage
from .scoring import BatchScores, score_batch

__version__ = "0.1.0"

__all__ = [
    "BatchScores",
    "DataError",
    "QTuneError",
    "TriageResult",
    "prune_tokens",
    "score_batch",
    "token_perplexity",
    "token_scores",
    "triage",
]

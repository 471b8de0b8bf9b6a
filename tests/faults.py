"""Faults injected into a run by the tests (and by their worker scripts, which run with tests/ on
their path)."""

import math


def nan_scores_at(call: int, score_batch):
    """`score_batch` (qtune.scorer's), with a NaN perplexity for the first sample of its `call`-th
    call (1-based): the scoring pass of that step turns non-finite, the others are untouched."""
    calls = []

    def scoring(*args, **kwargs):
        scores = score_batch(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            scores.ppl[0] = math.nan
        return scores

    return scoring

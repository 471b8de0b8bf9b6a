"""Final-answer exact match, scored as `qtune eval` scores it (lm-evaluation-harness's strict filter)."""

from __future__ import annotations

from ..evaluate import extract_strict, gold_answer, is_correct
from .base import completion_text, register


@register
def exact_match(completions, answer, **kwargs) -> list[float]:
    """1.0 where the number after the completion's first `#### ` equals the reference answer, else
    0.0 (no `#### N` in the completion included).

    Both sides are normalised as the harness does: commas, `$`, and one trailing period removed
    (`#### 1,234.` matches 1234), case ignored. The reference is the dataset's `answer` column:
    a final answer, or a whole GSM8K answer (the number after its last `#### ` is taken). Only the
    completion is read, never the prompt, so a `#### N` of a few-shot example in the prompt scores
    nothing; a completion that repeats such a line before its own answer is scored on the first one,
    as `qtune eval` would score it. With two `#### ` lines the first counts (`answer_format` gives
    such a completion 0)."""
    return [float(is_correct(extract_strict(completion_text(c)), gold_answer(str(a))))
            for c, a in zip(completions, answer)]

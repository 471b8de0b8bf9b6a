"""The GSM8K answer format: one `#### N` line."""

from __future__ import annotations

from ..evaluate import STRICT_PATTERN
from .base import completion_text, register


@register
def answer_format(completions, **kwargs) -> list[float]:
    """1.0 where the completion holds exactly one `#### `, on a line of its own that is `#### N`
    (N a number as the strict extractor reads it: digits, optionally signed, with `,` and `.`),
    else 0.0: no answer line, two of them (an echoed example's and its own), or `#### ` inside
    other text. Whether N is right is `exact_match`'s business."""
    scores = []
    for c in completions:
        text = completion_text(c)
        lines = [line for line in text.splitlines() if STRICT_PATTERN.fullmatch(line.strip())]
        scores.append(float(text.count("#### ") == 1 and len(lines) == 1))
    return scores

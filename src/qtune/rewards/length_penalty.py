"""A penalty on completion length, relative to the generation limit."""

from __future__ import annotations

from .base import register


@register
def length_penalty(completion_ids, *, max_completion_length: int, **kwargs) -> list[float]:
    """-n / max_completion_length for a completion of n tokens (its EOS included): 0 for an empty
    completion, -1 for one cut at the limit. `qtune rl` binds `max_completion_length` to its
    option of that name; give it a small weight (`length_penalty=0.1`) next to a correctness reward,
    so that among right answers the shorter ones are preferred."""
    return [-len(ids) / max_completion_length for ids in completion_ids]

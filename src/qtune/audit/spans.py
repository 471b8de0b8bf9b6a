"""From planted character spans to response tokens, so that token rules can be audited.

A sample's response tokens are the tokens of its trainable text pieces (`qtune.chat_templates`),
each piece tokenised on its own as `qtune.data.tokenize_chunk` does. The last trainable piece
holds the last answer, where planting writes; tokenised again with character offsets (a fast
tokenizer's), a token is planted when its characters overlap a planted span. The flags are kept
only when the tokens so found are exactly the sample's response tokens (`response_positions`
order), so that a flag can never land on another token: a slow tokenizer, a conversation split
per assistant turn, a truncated sample or a template that rewrites the answer give None.
"""

from __future__ import annotations

from ..chat_templates import render_samples
from ..data import IGNORE_INDEX, Record
from .planting import answer_of


def response_token_flags(record: Record, sample: dict, tokenizer) -> list[bool] | None:
    """Per response token of `sample` (the tokenised `record`), in order: whether it overlaps one
    of the record's planted spans (`metadata["audit"]["spans"]`); None when the tokens cannot be
    matched (see the module doc)."""
    if not getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        return None
    spans = record.metadata["audit"]["spans"]
    rendered = render_samples(record.messages, tokenizer)
    if len(rendered) != 1:
        return None
    segments = rendered[0].segments
    answer = answer_of(record.messages)
    last = max(i for i, (_, trainable) in enumerate(segments) if trainable)
    ids: list[int] = []
    flags: list[bool] = []
    for i, (text, trainable) in enumerate(segments):
        if not trainable:
            continue
        if i != last:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            flags += [False] * len(piece)
            continue
        start = text.find(answer)
        if start < 0:
            return None
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids += encoded["input_ids"]
        flags += [any(a < start + end and start + begin < b for begin, end in spans)
                  for a, b in encoded["offset_mapping"]]
    # Response positions: those with a label, the first position excepted (`response_positions`).
    response = [t for t, label in zip(sample["input_ids"][1:], sample["labels"][1:]) if label != IGNORE_INDEX]
    return flags if list(response) == ids else None

"""Static selectors for `qtune select`: one file per selector, registered by name.

A selector sees the whole dataset once (no training), as `SelectorInputs`, and returns a
`StaticChoice`: the kept sample ids, one score per sample (what it ranks by, written to
scores.parquet) and which direction it keeps. A selector declares what it needs (`needs`:
"scores", the scoring pass's PPL and entropy of every sample (`inputs.scores.ppl`, `.ent`;
without it they are None, unless the user asks for the pass); "answer_scores", the answers scored
without their instructions; "texts", each sample's text, its
(instruction, response) pair and its record's metadata; "model", the scoring model itself and the
tokenized samples, for a selector that computes with them (gradients); "target", the tokenized
samples of `--target-data` and their records' metadata) and `qtune.selection` builds only that.
Besides the selectors registered here, every pruning method with a static selection
(`Method.select_dataset`: `full`, `random`, `qtuning`) can be named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..methods.rules import top_samples

SELECTORS: dict[str, type] = {}


@dataclass
class SelectorInputs:
    """scores: the dataset's `DatasetScores` under the scoring model (sample ids and response
    lengths only, ppl and ent None, when no scoring pass ran); answer_scores: the same for the
    answers alone (when needed). With "texts", in `scores.sample_id` order: texts, each
    sample's conversation as one text; pairs, its (instruction, response) texts (the user and
    system turns, the assistant turns); metadata, its record's `metadata`. With "model": model,
    the scoring model; samples, the tokenized samples (in load order, each with its sample_id);
    pad_token_id. With "target": target_samples, the tokenized samples of --target-data, and
    target_metadata, each one's record's `metadata`."""

    scores: object
    answer_scores: object | None = None
    texts: list[str] | None = None
    pairs: list[tuple[str, str]] | None = None
    metadata: list[dict] | None = None
    model: object | None = None
    samples: object | None = None
    pad_token_id: int | None = None
    target_samples: object | None = None
    target_metadata: list[dict] | None = None


@dataclass
class StaticChoice:
    """kept: the kept sample ids; score: the per-sample value ranked (in `scores.sample_id` order;
    None when the selector ranks nothing); direction: what it keeps, in words; stats: numbers for
    the summary."""

    kept: list[int]
    score: list[float] | None
    direction: str
    stats: dict = field(default_factory=dict)


def register_selector(name: str):
    def add(cls):
        if name in SELECTORS:
            raise ValueError(f"selector {name!r} is already registered")
        cls.name = name
        SELECTORS[name] = cls
        return cls
    return add


def keep_top(values: list[float], count: int, *, highest: bool, allowed: list[bool] | None = None) -> list[int]:
    """Positions of the `count` largest (highest=True) or smallest values among the allowed ones
    (fewer when fewer are allowed), ties by position, in position order: the sample rules'
    `top_samples` on a dataset's values."""
    scores = torch.tensor(values, dtype=torch.float64)
    if allowed is not None:
        allowed = torch.tensor(allowed, dtype=torch.bool)
        scores = scores.masked_fill(~allowed, -math.inf if highest else math.inf)  # ranked last
    kept = top_samples(scores, count, highest=highest)
    if allowed is not None:
        kept &= allowed
    return kept.nonzero().flatten().tolist()


from . import diversity, hardness, ifd, less, perplexity  # noqa: E402,F401 (register the selectors)

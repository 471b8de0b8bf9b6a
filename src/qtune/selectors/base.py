"""The selector contract: what a selector sees (`SelectorInputs`), what it returns
(`StaticChoice`), the registry (`SELECTORS`, `register_selector`) and `keep_top`. Its own module,
below the selectors that import it, so that the package's `__init__` only registers them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import SELECTOR_NAMES
from ..methods.rules import top_samples
from ..processes import Processes

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
    target_metadata, each one's record's `metadata`. processes: the launched processes
    (`qtune.processes`); a selector that runs the model over the dataset shares its batches out
    with `run_batches` and says so with the class attribute `shares_passes = True`: then every
    process calls its `choose`, else the main process alone does."""

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
    processes: Processes = field(default_factory=Processes)


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
        SELECTOR_NAMES.add(name)
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


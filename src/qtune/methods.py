"""Pruning methods: what a training step keeps of its batch. One registry serves the CLI, the
config files and the benchmarks.

A method sees every micro-batch of one optimizer step (and, when `needs_scores_at` the step, their
`BatchScores` from a no-grad pass with the current weights) and returns, per micro-batch, the rows
to train on and the label mask (True = the token keeps its loss). Deciding over the whole step is
what makes Stage 1's quantiles "per global batch" under gradient accumulation.

Add a method with `@register("name")` on a subclass of `PruningMethod`; its constructor takes
the training config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import QTuneError
from .pruning import prune_tokens, token_perplexity, triage
from .scoring import IGNORE_INDEX, BatchScores


@dataclass
class Selection:
    """What one micro-batch keeps: `rows` (int64 indices) and `label_mask` (bool [B, L])."""

    rows: torch.Tensor
    label_mask: torch.Tensor


@dataclass
class StepSelection:
    """A method's decision for one optimizer step, with statistics for the step log."""

    selections: list[Selection]
    stats: dict = field(default_factory=dict)


def response_mask_of(batch: dict) -> torch.Tensor:
    """Positions that receive loss in the unpruned batch (the first token never does)."""
    mask = batch["labels"] != IGNORE_INDEX
    mask[:, 0] = False
    return mask


def keep_count(ratio: float, n: int) -> int:
    """max(1, floor(ratio * n)), the exact count the paper's budgets ask for."""
    return max(1, int(ratio * n + 1e-9))


class PruningMethod:
    """Base class. `needs_scores` (or `needs_scores_at`, for a method that scores only some steps) says
    whether the trainer runs the no-grad scoring pass."""

    name = "base"
    needs_scores = False

    def __init__(self, config):
        self.config = config

    def needs_scores_at(self, step: int, total_steps: int) -> bool:
        """Whether the trainer runs the scoring pass before `select` at this step."""
        return self.needs_scores

    def select(self, batches: list[dict], scores: list[BatchScores] | None, step: int) -> StepSelection:
        raise NotImplementedError


METHODS: dict[str, type[PruningMethod]] = {}


def register(name: str) -> Callable[[type[PruningMethod]], type[PruningMethod]]:
    def add(cls: type[PruningMethod]) -> type[PruningMethod]:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def build_method(name: str, config) -> PruningMethod:
    if name not in METHODS:
        raise QTuneError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](config)


def _split(flags: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flags, sizes))


@register("full")
class FullData(PruningMethod):
    """Standard SFT: every sample, every response token."""

    def select(self, batches, scores, step):
        selections = [Selection(torch.arange(b["labels"].shape[0]), response_mask_of(b)) for b in batches]
        n = sum(b["labels"].shape[0] for b in batches)
        return StepSelection(selections, {"samples": n, "kept": n})


@register("random")
class RandomPruning(PruningMethod):
    """Uniformly random samples and, inside them, uniformly random response tokens, at the same
    ratios as Q-Tuning. The draw depends only on (seed, step), so a resumed run repeats it."""

    def select(self, batches, scores, step):
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        sizes = [b["labels"].shape[0] for b in batches]
        n = sum(sizes)
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[torch.randperm(n, generator=generator)[: keep_count(cfg.r_sample, n)]] = True
        selections = []
        for batch, kept in zip(batches, _split(chosen, sizes)):
            response = response_mask_of(batch)
            # Random scores with no neighbour term: prune_tokens keeps a uniform random subset.
            noise = torch.rand(response.shape, generator=generator).to(response.device)
            mask = prune_tokens(noise, response, cfg.r_token, lam=0.0)
            selections.append(Selection(kept.nonzero().flatten(), mask))
        return StepSelection(selections, {"samples": n, "kept": int(chosen.sum())})


@register("qtuning")
class QTuning(PruningMethod):
    """Q-Tuning: triage the step's samples on the EU plane, keep Q2 + Q4, prune Q2's tokens."""

    needs_scores = True

    def __init__(self, config):
        super().__init__(config)  # TrainConfig has checked triage_start, in [0, 1)
        self._before_triage = RandomPruning(config)

    def needs_scores_at(self, step, total_steps):
        return step >= int(self.config.triage_start * total_steps)

    def select(self, batches, scores, step):
        if scores is None:  # a step before `triage_start`: random selection at the same budget
            decision = self._before_triage.select(batches, None, step)
            decision.stats["before_triage"] = True
            return decision
        cfg = self.config
        sizes = [b["labels"].shape[0] for b in batches]
        decision = triage(torch.cat([s.ppl for s in scores]), torch.cat([s.ent for s in scores]),
                          cfg.r_sample, reference=cfg.reference)
        kept = torch.zeros(sum(sizes), dtype=torch.bool, device=decision.keep.device)
        kept[decision.keep] = True
        budget = "batch" if cfg.reference else cfg.token_budget
        selections = []
        for s, keep_rows, prune_rows in zip(scores, _split(kept, sizes), _split(decision.prune_tokens, sizes)):
            rows = keep_rows.nonzero().flatten()
            mask = torch.zeros_like(s.response_mask)
            if rows.numel():
                # The authors' pooled budget counts every response token of the micro-batch.
                batch_keep = (round(int(s.response_mask.sum()) * cfg.r_sample * cfg.r_token)
                              if budget == "batch" else None)
                mask[rows] = prune_tokens(
                    token_perplexity(s.nll[rows]), s.response_mask[rows], cfg.r_token, lam=cfg.lam,
                    neighbor=cfg.neighbor, edge=cfg.edge, budget=budget, rows=prune_rows[rows],
                    batch_keep=batch_keep,
                )
            selections.append(Selection(rows, mask))
        stats = {"samples": sum(sizes), **decision.counts(), "level": decision.level}
        return StepSelection(selections, stats)

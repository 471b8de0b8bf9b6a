"""`full`: standard SFT, every sample and every response token (the baseline of every budget)."""

from __future__ import annotations

import torch

from ..config import FullConfig
from .base import DatasetSelection, Decision, Method, Selection, register, response_mask_of


@register("full")
class FullData(Method):
    """Every sample, every response token. Needs no scores, keeps no state."""

    config_class = FullConfig

    def select(self, batches, scores, step):
        selections = [Selection(torch.arange(b["labels"].shape[0]), response_mask_of(b)) for b in batches]
        n = sum(b["labels"].shape[0] for b in batches)
        return Decision.over(batches, selections, self.nominal_budget, {"samples": n, "kept": n})

    def select_dataset(self, scores):
        return DatasetSelection(list(scores.sample_id),
                                {i: [True] * n for i, n in zip(scores.sample_id, scores.n_response)})

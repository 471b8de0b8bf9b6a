"""The `perplexity` selector: keep `ratio` of the samples by their perplexity under the scoring
model, the lowest (default: a filter of what the model finds implausible, noise first), the
highest (the hardest), or the middle (both tails dropped: the same positions of the ascending
order as the `perplexity` sample rule's middle, `qtune.methods.rules.middle_samples`).

Citation: the perplexity filters of data-selection surveys (e.g. Marion et al. 2023, "When Less
is More: Investigating Data Pruning for Pretraining LLMs at Scale", arXiv 2309.04564, which keeps
the middle); the static counterpart of the `perplexity` sample rule. Ties: earlier sample first.
"""

from __future__ import annotations

import torch

from ..methods.rules import middle_samples
from ..pruning import keep_count
from .base import StaticChoice, keep_top, register_selector


@register_selector("perplexity")
class PerplexitySelector:
    """keep_count(ratio, N) samples of lowest, highest or middle PPL (select_keep; ties: earlier sample first)"""

    needs = frozenset({"scores"})

    def choose(self, cfg, inputs) -> StaticChoice:
        scores = inputs.scores
        ppl = list(scores.ppl)
        count = keep_count(cfg.ratio, len(ppl))
        if cfg.select_keep == "middle":
            positions = middle_samples(torch.tensor(ppl), count).nonzero().flatten().tolist()
        else:
            positions = keep_top(ppl, count, highest=cfg.select_keep == "highest")
        return StaticChoice([scores.sample_id[i] for i in positions], ppl, f"{cfg.select_keep} perplexity")

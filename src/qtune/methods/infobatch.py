"""The `infobatch` and `infobatch_exact` sample rules, after InfoBatch (Qin et al., "InfoBatch:
Lossless Training Speed Up by Unbiased Dynamic Data Pruning", ICLR 2024, arXiv 2303.04947), the
"InfoBatch" sample baseline of Q-Tuning (arXiv 2509.23873, App. B.3).

InfoBatch prunes softly and keeps the expected gradient: a sample whose loss is below the mean
("well learned") is dropped at random with probability r (its prune ratio, default 0.5), a kept
well-learned sample's loss is scaled by 1/(1 - r), the others are always kept with weight 1; for
the final part of training (1 - delta, delta = 0.875) it trains on the full data (annealing).
The paper scores each sample by its most recent training loss and prunes once per epoch; here,
as every baseline of this project, it decides per optimizer step over the step's samples, the loss
of a sample being its mean response-token NLL from the scoring pass (the current weights).

`infobatch` (this rule, per step): well learned = loss < the step's mean loss (a sample at the
mean is kept); each is dropped when its uniform draw (one `torch.rand(N)` of the step's generator)
is below r = `infobatch_prune`; kept ones get weight 1/(1 - r) through `Selection.weights`. The
kept count varies from step to step, so the nominal budget counts every sample (sample share 1);
read the measured budget. The last `infobatch_anneal` fraction of the steps (from step
floor((1 - anneal) x T), T the run's optimizer steps) keeps every sample with weight 1 and asks
for no scoring pass unless the token rule needs one.

`infobatch_exact` (the project's spec, section 7: a per-batch adaptation that hits Q-Tuning's exact
sample ratio; the Q-Tuning paper does not say how it adapted InfoBatch): exactly
k = keep_count(r_sample, N) samples, the not-well-learned ones first, in a uniformly random order
(one `randperm(N)`), so that when they are more than k a random k of them is kept (weight 1; the
spec leaves this case open), and otherwise the places left go to well-learned samples drawn at
random, each weighted 1/(the kept fraction of the well-learned samples) = (well-learned count) /
(kept well-learned count). It does not anneal: the ratio is exact at every step.
"""

from __future__ import annotations

import math

import torch

from ..config import InfoBatchConfig
from ..pruning import keep_count
from .oracle import preferred_first
from .rules import SampleChoice, SampleRule, register_sample_rule


def anneal_start(anneal: float, total_steps: int) -> int:
    """The first step (0-based) of the final `anneal` fraction of `total_steps`:
    floor((1 - anneal) x total_steps), with a 1e-9 slack for floating-point error."""
    return math.floor((1 - anneal) * total_steps + 1e-9)


def well_learned(view) -> torch.Tensor:
    """bool [N]: the samples whose loss (mean response-token NLL) is below the step's mean loss."""
    loss = view.sample_scores("loss").double()
    return loss < loss.mean()


@register_sample_rule("infobatch")
class InfoBatchSamples(SampleRule):
    """below-mean-loss samples dropped with probability r (infobatch_prune), kept ones weigh 1/(1-r); annealed"""

    config_class = InfoBatchConfig
    needs = frozenset({"nll"})

    def share(self, cfg) -> float:
        return 1.0

    @staticmethod
    def annealing(cfg, step: int, total_steps: int | None) -> bool:
        """Whether `step` lies in the final `infobatch_anneal` fraction (never when the run's
        length is unknown)."""
        return total_steps is not None and step >= anneal_start(cfg.infobatch_anneal, total_steps)

    def needs_scores_at(self, cfg, step, total_steps):
        return not self.annealing(cfg, step, total_steps)

    def choose(self, cfg, view):
        if self.annealing(cfg, view.step, view.total_steps):
            return SampleChoice(torch.ones(view.n, dtype=torch.bool), None, {"annealing": True})
        low = well_learned(view)
        dropped = low & (torch.rand(low.numel(), generator=view.generator) < cfg.infobatch_prune)
        weights = torch.where(low, 1 / (1 - cfg.infobatch_prune), 1.0).float()
        return SampleChoice(~dropped, weights, {"well_learned": int(low.sum()), "dropped": int(dropped.sum())})


@register_sample_rule("infobatch_exact")
class InfoBatchExactSamples(SampleRule):
    """keep_count(r_sample, N): above-mean-loss samples first, then random below-mean ones, reweighted"""

    needs = frozenset({"nll"})

    def choose(self, cfg, view):
        low = well_learned(view)
        kept = preferred_first(~low, keep_count(cfg.r_sample, low.numel()), view.generator)
        kept_low = int((kept & low).sum())
        weights = torch.where(low, int(low.sum()) / max(kept_low, 1), 1.0).float()
        return SampleChoice(kept, weights, {"well_learned": int(low.sum()), "kept_well_learned": kept_low})

"""The `perplexity` sample rule: keep the samples of the step with the highest, the lowest or the
middle perplexity PPL = exp(mean NLL over the response), from the scoring pass with the current
weights (`ppl_keep`: high | low | middle, default middle).

Citation: Marion et al., "When Less is More: Investigating Data Pruning for Pretraining LLMs at
Scale" (arXiv 2309.04564), which keeps the bottom, middle or top of the perplexity distribution
(scored by a reference model, once) and finds the middle best; here the current model scores each
step, as Q-Tuning's PPL axis does (arXiv 2509.23873, Eq. 4). Not part of Q-Tuning's baseline
grid: a single-axis control for its PPL axis.

With k = keep_count(r_sample, N): `high` keeps the k samples of highest PPL, `low` the k of
lowest, ties going to the earlier sample; `middle` keeps positions floor((N - k) / 2) to
floor((N - k) / 2) + k - 1 of the ascending PPL order (ties: the earlier sample first in it).
"""

from __future__ import annotations

from ..config import PerplexitySampleConfig
from ..pruning import keep_count
from .rules import SampleChoice, SampleRule, middle_samples, register_sample_rule, top_samples


@register_sample_rule("perplexity")
class PerplexitySamples(SampleRule):
    """keep_count(r_sample, N) samples of highest, lowest or middle PPL (ppl_keep; ties: earlier sample first)"""

    config_class = PerplexitySampleConfig
    needs = frozenset({"nll"})

    def choose(self, cfg, view):
        ppl = view.sample_scores("ppl")
        k = keep_count(cfg.r_sample, ppl.numel())
        if cfg.ppl_keep == "middle":
            return SampleChoice(middle_samples(ppl, k))
        return SampleChoice(top_samples(ppl, k, highest=cfg.ppl_keep == "high"))

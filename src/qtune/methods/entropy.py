"""The `entropy` sample rule: keep the samples of the step whose mean predictive entropy over
their response tokens (Ent, from the scoring pass with the current weights) is the highest.

Citation: the "Entropy" sample baseline of Q-Tuning (Wang et al., "Winning the Pruning Gamble",
arXiv 2509.23873, App. B.3: "retained high-entropy samples"); Ent is its Eq. 5. The paper does not
say whether it was computed once or per step; here it is per step, with the current model, as
Q-Tuning's own scores are (the project's spec, section 7).
"""

from __future__ import annotations

from ..pruning import keep_count
from .rules import SampleChoice, SampleRule, register_sample_rule, top_samples


@register_sample_rule("entropy")
class EntropySamples(SampleRule):
    """keep_count(r_sample, N) samples with the highest mean token entropy (ties: earlier sample first)"""

    needs = frozenset({"entropy"})

    def choose(self, cfg, view):
        ent = view.sample_scores("ent")
        return SampleChoice(top_samples(ent, keep_count(cfg.r_sample, ent.numel()), highest=True))

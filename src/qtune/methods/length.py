"""The `longest` and `shortest` sample rules: keep the samples of the step with the most (or the
fewest) response tokens. No scoring pass.

Citation: the "Longest" sample baseline of Q-Tuning (Wang et al., "Winning the Pruning Gamble",
arXiv 2509.23873, App. B.3), the strongest baseline family of its Tables 1, 8 and 9; the length
heuristic itself is Zhao et al., "Long Is More for Alignment: A Simple but Tough-to-Beat Baseline
for Instruction Fine-Tuning" (ICML 2024, arXiv 2402.04833). The Q-Tuning text says the longest
sequences were *removed* while the name says they are kept (open question 8 of the project's
spec): `longest` keeps them, as the name and Zhao et al. do; `shortest` is the other reading.

Length is the number of response tokens (positions that receive loss), not the prompt's.
"""

from __future__ import annotations

from ..pruning import keep_count
from .rules import SampleChoice, SampleRule, register_sample_rule, top_samples


@register_sample_rule("longest")
class LongestSamples(SampleRule):
    """keep_count(r_sample, N) samples with the most response tokens (ties: earlier sample first)"""

    highest = True

    def choose(self, cfg, view):
        lengths = view.response_lengths()
        return SampleChoice(top_samples(lengths, keep_count(cfg.r_sample, lengths.numel()), highest=self.highest))


@register_sample_rule("shortest")
class ShortestSamples(LongestSamples):
    """keep_count(r_sample, N) samples with the fewest response tokens (ties: earlier sample first)"""

    highest = False

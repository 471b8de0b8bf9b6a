"""The `random` sample rule and the `random` token rule: the chance baselines of the Q-Tuning
paper's grid (Wang et al., "Winning the Pruning Gamble", arXiv 2509.23873, App. B.3: "Random"
sample and token pruning). `random+random` decides exactly as the `random` method (same draws
from the same (seed, step) generator, in the same order)."""

from __future__ import annotations

from .base import response_mask_of
from .random import random_samples, random_token_masks
from .rules import SampleChoice, SampleRule, TokenRule, register_sample_rule, register_token_rule


@register_sample_rule("random")
class RandomSamples(SampleRule):
    """keep_count(r_sample, N) samples drawn uniformly (one randperm(N) of the step's generator)"""

    def choose(self, cfg, view):
        return SampleChoice(random_samples(view.n, cfg.r_sample, view.generator))


@register_token_rule("random")
class RandomTokens(TokenRule):
    """keep_count(r_token, n) response tokens per kept sample, drawn uniformly"""

    def masks(self, cfg, batch, scores, generator):
        return random_token_masks(response_mask_of(batch), cfg.r_token, generator)

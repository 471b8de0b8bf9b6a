"""The `attention` token rule: in each kept sample, the keep_count(r_token, n) response tokens
that receive the most attention in the last decoder layer keep their loss; those attended to
least are pruned. Received attention is the mean over heads and over the later (attended)
positions of the attention they pay to the token (`qtune.attention`), from the scoring pass.

Citation: the attention-based token baseline of Q-Tuning's Table 14, "pruned tokens receiving the
least final-layer attention", in the spirit of FastV (Chen et al., "An Image is Worth 1/2 Tokens
After Layer 2", ECCV 2024), which drops the image tokens receiving the least attention at an
early layer for inference; how the paper averaged is not stated (spec, section 7): here over
heads and attending positions. Needs Llama-style attention (Llama, Qwen2/3, Mistral).

Ties: the earlier position first (`qtune.pruning.prune_tokens` with lam = 0 on the negated
attention).
"""

from __future__ import annotations

from ..pruning import prune_tokens
from .rules import TokenRule, register_token_rule


@register_token_rule("attention")
class AttentionTokens(TokenRule):
    """keep_count(r_token, n) tokens per kept sample that receive the most last-layer attention (ties: earlier position)"""

    needs = frozenset({"attention"})

    def masks(self, cfg, batch, scores, generator):
        return prune_tokens(-scores.attention, scores.response_mask, cfg.r_token, lam=0.0)

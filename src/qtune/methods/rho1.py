"""The `rho1` token rule: in each kept sample, the keep_count(r_token, n) response tokens of
highest excess loss keep their loss, excess loss = the current model's token NLL minus a
reference model's (`--reference-model`). Tokens the reference predicts well but the current model
does not are the ones still worth learning; tokens both find hard (noise) or both find easy
(learned) are pruned.

Citation: Rho-1 / Selective Language Modeling (Lin et al., "Not All Tokens Are What You Need for
Pretraining", NeurIPS 2024, arXiv 2404.07965), the token baseline of Q-Tuning's Table 5. Rho-1
trains its reference model on high-quality data; which one Q-Tuning used for SFT is not stated
(the project's spec, section 7, Open Q7): a natural choice is the base model fine-tuned on a small
clean subset. Rho-1 ranks the tokens of the whole batch; here, as every token rule of this
project, each kept sample keeps its own share (the step's budget stays exact per sample).

Ties: equal excess losses keep the earlier position first (`qtune.pruning.prune_tokens` with
lam = 0 on the negated excess).
"""

from __future__ import annotations

from ..config import ReferenceModelConfig
from ..pruning import prune_tokens
from .rules import TokenRule, register_token_rule


@register_token_rule("rho1")
class Rho1Tokens(TokenRule):
    """keep_count(r_token, n) tokens of highest excess loss (current NLL - reference NLL) per kept sample"""

    config_class = ReferenceModelConfig
    needs = frozenset({"nll", "reference_nll"})

    def masks(self, cfg, batch, scores, generator):
        excess = scores.nll - scores.reference_nll
        return prune_tokens(-excess, scores.response_mask, cfg.r_token, lam=0.0)

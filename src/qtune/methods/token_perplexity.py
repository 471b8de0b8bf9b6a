"""The `perplexity` token rule: in each kept sample, the keep_count(r_token, n) response tokens of
lowest NLL (= lowest token perplexity exp(NLL)) keep their loss; the highest-NLL ones are pruned.
`ppl_reversed` keeps the highest-NLL ones instead. NLL from the scoring pass with the current
weights.

Citation: the "PPL" token baseline of Q-Tuning (Wang et al., "Winning the Pruning Gamble", arXiv
2509.23873, App. B.3: "removed high-perplexity tokens"), which is Q-Tuning's own token score with
lambda = 0 applied to every kept sample (the project's spec, section 7).

Direction. The paper's text prunes the high-perplexity tokens, and this is the default. The
authors' training code (repository Q-tuning/Q-tuning, `token_method == "ppl"`) does the opposite:
it keeps the round(r_token x n) tokens of *highest* loss, pooled over the kept samples of the
batch. `ppl_reversed = true` takes that direction (per sample and floored, as the default is); the
paper's Table 5 "Reversed PPL" ablation (inside Q-Tuning's Q2 samples) also keeps high-PPL tokens.

Ties: equal NLLs keep the earlier position first, in both directions (`qtune.pruning.prune_tokens`
with lam = 0 on the NLL, or on -NLL when reversed).
"""

from __future__ import annotations

from ..config import PerplexityTokenConfig
from ..pruning import prune_tokens
from .rules import TokenRule, register_token_rule


@register_token_rule("perplexity")
class PerplexityTokens(TokenRule):
    """keep_count(r_token, n) lowest-NLL tokens per kept sample (ppl_reversed: highest; ties: earlier position)"""

    config_class = PerplexityTokenConfig
    needs = frozenset({"nll"})

    def masks(self, cfg, batch, scores, generator):
        nll = -scores.nll if cfg.ppl_reversed else scores.nll
        return prune_tokens(nll, scores.response_mask, cfg.r_token, lam=0.0)

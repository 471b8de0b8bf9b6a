"""The `ifd` selector: Instruction-Following Difficulty, the answer's loss with the instruction
over its loss without it, IFD = s(A | Q) / s(A) (mean token cross-entropies). A high IFD means
the instruction helps little to predict the answer: a sample that still teaches instruction
following. Samples with IFD >= `ifd_max` (1 by default: the instruction makes the answer harder to
predict, a sign of a mismatched pair) are dropped first; of the rest, keep_count(ratio, N) of
highest IFD are kept (fewer when fewer remain).

Citation: Li et al. 2024, "From Quantity to Quality: Boosting LLM Performance with Self-Guided
Data Selection" (Cherry LLM, NAACL 2024, arXiv 2308.12032); scored with a small model sharing the
tokenizer, this is Superfiltering (Li et al. 2024, ACL, arXiv 2402.00530): pass that model as
--model. s(A) is scored on the response tokens alone, after the tokenizer's BOS token when it has
one. Ties: earlier sample first.
"""

from __future__ import annotations

import math

from ..pruning import keep_count
from .base import StaticChoice, keep_top, register_selector


@register_selector("ifd")
class IFDSelector:
    """keep_count(ratio, N) samples of highest IFD = loss(A|Q) / loss(A), those with IFD >= ifd_max dropped"""

    needs = frozenset({"scores", "answer_scores"})

    def choose(self, cfg, inputs) -> StaticChoice:
        scores = inputs.scores
        ifd = [math.log(with_q) / math.log(alone) if alone > 1 else math.inf
               for with_q, alone in zip(scores.ppl, inputs.answer_scores.ppl)]
        allowed = [value < cfg.ifd_max for value in ifd]
        count = keep_count(cfg.ratio, len(ifd))
        positions = keep_top(ifd, count, highest=True, allowed=allowed)
        return StaticChoice([scores.sample_id[i] for i in positions], ifd, "highest IFD below ifd_max",
                            {"dropped_ifd_at_least_max": allowed.count(False)})

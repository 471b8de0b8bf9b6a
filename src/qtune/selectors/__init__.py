"""Static selectors for `qtune select`: one file per selector, registered by name.

A selector sees the whole dataset once (no training), as `SelectorInputs`, and returns a
`StaticChoice`: the kept sample ids, one score per sample (what it ranks by, written to
scores.parquet) and which direction it keeps. A selector declares what it needs (`needs`:
"scores", the scoring pass's PPL and entropy of every sample (`inputs.scores.ppl`, `.ent`;
without it they are None, unless the user asks for the pass); "answer_scores", the answers scored
without their instructions; "texts", each sample's text, its
(instruction, response) pair and its record's metadata; "model", the scoring model itself and the
tokenized samples, for a selector that computes with them (gradients); "target", the tokenized
samples of `--target-data` and their records' metadata) and `qtune.selection` builds only that.
Besides the selectors registered here, every pruning method with a static selection
(`Method.select_dataset`: `full`, `random`, `qtuning`) can be named.
"""

from . import diversity, grads, hardness, ifd, less, perplexity, rds, thtb  # noqa: F401 (register the selectors)
from .base import SELECTORS, SelectorInputs, StaticChoice, keep_top, register_selector

__all__ = ["SELECTORS", "SelectorInputs", "StaticChoice", "keep_top", "register_selector"]

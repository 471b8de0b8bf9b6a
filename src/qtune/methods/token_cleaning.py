"""The `token_cleaning` token rule: keep_count(r_token, T) of the T response tokens of the whole
training set keep their loss, those of highest influence; influence = the token's NLL under the
base model (the model being trained, at its initial weights) minus its NLL under a fixed
reference model (`--reference-model`). A token the reference has learnt and the base model has
not is informative and kept; a token both predict alike (already known, or noise that neither
learns) is cleaned out of the loss. The threshold is global: one ranking over every response
token of the training set, so a sample keeps a share of its tokens that varies from sample to
sample (none, for some), and a step's loss-token share varies around r_token x (its sample
share). The nominal budget stays r_sample x r_token, the measured one is logged per step
(`kept_tokens` / `response_tokens`, from the masks actually applied).

Citation: Token Cleaning, Pang et al., "Token Cleaning: Fine-Grained Data Selection for LLM
Supervised Fine-Tuning", ICML 2025, arXiv 2502.01968, its Fixed-Model Cleaning (one pass with a
fixed reference model; their runs warm the reference up on a small high-quality subset and keep
60% of the tokens); the token baseline of Q-Tuning's Table 14. Self-Evolving Cleaning (the
reference retrained chunk by chunk) is not implemented. Reimplemented from the paper.

When it decides: once, before the first step. The trainer scores every training sample with the
initial weights and the reference model (`pass_needs`; `qtune.trainer.QTuneTrainer.train`), this
rule keeps the influence of each response token (`pass_values`), then fixes every sample's mask
(`fix_masks`). The steps apply the stored masks to the kept samples' response tokens: no scoring
pass, no reference model in memory, no extra forward per step.

Exact count and ties: exactly keep_count(r_token, T) = max(1, floor(r_token x T)) tokens are
kept; the lowest kept influence is the keep_count-th highest, and among tokens of exactly that
influence the earlier ones are kept first, in the order of (sample_id, position in the response).

Memory: the pass holds one float32 per response token of the training set (4 bytes a token);
fixing the masks adds their concatenation (4), torch.kthvalue's working copy (4) and the mask (1),
plus 8 per token tied at the threshold: at most 21 bytes per response token at the peak, freed
before training. The run holds the masks: 1 byte per response token, 16 bytes per sample.

Resume: the masks are saved in the run's folder before the first step (`qtune.trainer.TOKEN_MASKS`,
safetensors, written atomically) and read back on --resume, never recomputed: a resume with
another --device or --dtype would rank ties and near-ties differently.
"""

from __future__ import annotations

import torch

from ..config import ReferenceModelConfig
from ..errors import QTuneError
from ..pruning import keep_count
from .base import TokenMasks
from .rules import TokenRule, register_token_rule


def global_top_tokens(values: torch.Tensor, ratio: float) -> tuple[torch.Tensor, float]:
    """(bool [T] keeping the keep_count(ratio, T) highest of `values`, the lowest kept value).
    `values`: float [T], finite, in the order that breaks ties (the earlier first)."""
    total = values.numel()
    count = keep_count(ratio, total)
    threshold = torch.kthvalue(values, total - count + 1).values  # the count-th highest
    keep = values > threshold
    tied = (values == threshold).nonzero().flatten()
    keep[tied[: count - int(keep.sum())]] = True
    return keep, float(threshold)


@register_token_rule("token_cleaning")
class TokenCleaning(TokenRule):
    """keep_count(r_token, T) of the training set's T response tokens, highest influence (base NLL - reference NLL), fixed before training"""

    config_class = ReferenceModelConfig
    pass_needs = frozenset({"nll", "reference_nll"})

    def pass_values(self, cfg, scores):
        influence = (scores.nll - scores.reference_nll).cpu()
        return [row[mask] for row, mask in zip(influence, scores.response_mask.cpu())]

    def fix_masks(self, cfg, values):
        ids = sorted(values)
        rows = [values[i] for i in ids]
        flat = torch.cat(rows)
        bad = int((~flat.isfinite()).sum())
        if bad:
            raise QTuneError(f"token_cleaning: {bad} response tokens of the training set have a non-finite loss under "
                             "the model or the reference model; check both models on this data")
        keep, threshold = global_top_tokens(flat, cfg.r_token)
        lengths = [r.numel() for r in rows]
        offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        without = sum(1 for part in torch.split(keep, lengths) if not part.any())
        info = {"rule": self.name, "r_token": repr(cfg.r_token), "reference_model": str(cfg.reference_model),
                "threshold": repr(threshold), "kept_tokens": str(int(keep.sum())), "response_tokens": str(flat.numel()),
                "samples": str(len(ids)), "samples_without_kept_tokens": str(without)}
        return TokenMasks(torch.tensor(ids, dtype=torch.long), offsets, keep, info)

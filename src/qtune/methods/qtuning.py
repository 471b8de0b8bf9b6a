"""`qtuning`: Q-Tuning (arXiv 2509.23873). Stage 1 triages the step's samples on the
Error-Uncertainty plane and keeps Q2 (high PPL, low entropy) and Q4 (low PPL, high entropy);
Stage 2 prunes the tokens of the kept Q2 samples. The two stages are `qtune.pruning`'s pure
functions; this file only applies them to a step (or a dataset) with the method's options."""

from __future__ import annotations

import torch

from ..config import QTuningConfig
from ..errors import QTuneError
from ..phases import PhaseClock
from ..pruning import prune_tokens, token_perplexity, triage
from .base import DatasetSelection, Decision, Method, Selection, register, split_rows
from .random import RandomPruning


@register("qtuning")
class QTuning(Method):
    """Needs the NLL and entropy of every response token. Before `triage_start` it selects like
    `random` at the same budget and asks for no scores. No state."""

    config_class = QTuningConfig
    needs = frozenset({"nll", "entropy"})

    def __init__(self, config):
        super().__init__(config)  # QTuningConfig has checked triage_start, in [0, 1)
        self._before_triage = RandomPruning(config)

    @property
    def nominal_budget(self) -> float:
        return self.config.r_sample * self.config.r_token

    @property
    def entropy_over(self) -> str:
        # The authors' code averages entropy over every attended position, the paper over the response.
        return "attended" if self.config.reference else "response"

    @property
    def _token_budget(self) -> str:
        return "batch" if self.config.reference else self.config.token_budget

    def needs_scores_at(self, step, total_steps):
        return step >= int(self.config.triage_start * total_steps)

    def _prune(self, nll, response, rows, prune_rows, pool: int) -> torch.Tensor:
        """Stage 2 on `rows` of a block of token NLLs; `pool` is the response-token count that the
        authors' pooled budget ("batch") is taken from."""
        cfg = self.config
        budget = self._token_budget
        batch_keep = round(pool * cfg.r_sample * cfg.r_token) if budget == "batch" else None
        return prune_tokens(token_perplexity(nll[rows]), response[rows], cfg.r_token, lam=cfg.lam,
                            neighbor=cfg.neighbor, edge=cfg.edge, budget=budget, rows=prune_rows[rows],
                            batch_keep=batch_keep)

    def select(self, batches, scores, step):
        if scores is None:  # a step before `triage_start`: random selection at the same budget
            decision = self._before_triage.select(batches, None, step)
            decision.stats["before_triage"] = True
            return decision
        cfg = self.config
        clock = PhaseClock(scores[0].ppl.device)
        with clock.phase("triage"):
            decision = triage(torch.cat([s.ppl for s in scores]), torch.cat([s.ent for s in scores]),
                              cfg.r_sample, reference=cfg.reference)
            kept = torch.zeros(decision.quadrant.numel(), dtype=torch.bool, device=decision.keep.device)
            kept[decision.keep] = True
        selections = []
        with clock.phase("token_select"):
            for s, keep_rows, prune_rows in zip(scores, split_rows(kept, batches),
                                                split_rows(decision.prune_tokens, batches)):
                rows = keep_rows.nonzero().flatten()
                mask = torch.zeros_like(s.response_mask)
                if rows.numel():
                    # The authors' pooled budget counts every response token of the micro-batch.
                    mask[rows] = self._prune(s.nll, s.response_mask, rows, prune_rows, int(s.response_mask.sum()))
                selections.append(Selection(rows, mask))
        stats = {"samples": decision.quadrant.numel(), **decision.counts(), "level": decision.level}
        return Decision.over(batches, selections, self.nominal_budget, stats, clock.seconds)

    def select_dataset(self, scores):
        """Triage over the whole dataset (the quantiles are the dataset's), then Stage 2 on the
        kept Q2 samples; needs the per-token scores (`score_dataset(..., per_token=True)`)."""
        if self.config.reference:
            raise QTuneError("static selection does not reproduce the authors' code (reference): it triages per "
                             "batch with entropy over attended positions, which a dataset's scores do not hold")
        if scores.token_nll is None:
            raise QTuneError("qtuning's static selection needs per-token scores (score with per_token=True)")
        decision = triage(torch.tensor(scores.ppl), torch.tensor(scores.ent), self.config.r_sample)
        kept = decision.keep
        lengths = [scores.n_response[i] for i in kept.tolist()]
        width = max(lengths)
        nll = torch.zeros(len(lengths), width)
        for j, i in enumerate(kept.tolist()):
            nll[j, : lengths[j]] = torch.tensor(scores.token_nll[i])
        response = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        rows = torch.arange(len(lengths))
        masks = self._prune(nll, response, rows, decision.prune_tokens[kept], sum(scores.n_response))
        return DatasetSelection([scores.sample_id[i] for i in kept.tolist()],
                                {scores.sample_id[i]: masks[j, :lengths[j]].tolist()
                                 for j, i in enumerate(kept.tolist())})

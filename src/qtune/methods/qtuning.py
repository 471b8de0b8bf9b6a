"""`qtuning`: Q-Tuning (arXiv 2509.23873). Stage 1 triages the step's samples on the
Error-Uncertainty plane and keeps Q2 (high PPL, low entropy) and Q4 (low PPL, high entropy);
Stage 2 prunes the tokens of the kept Q2 samples. The two stages are `qtune.pruning`'s pure
functions; this file only applies them to a step (or a dataset) with the method's options,
including the paper's ablations (`QTuningAblationConfig`: one stage only, keep Q1, prune Q4's
tokens, reversed token order)."""

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
        cfg = self.config
        return {"both": cfg.r_sample * cfg.r_token, "sample": cfg.r_sample, "token": cfg.r_token}[cfg.stages]

    @property
    def entropy_over(self) -> str:
        # The authors' code averages entropy over every attended position, the paper over the response.
        return "attended" if self.config.reference else "response"

    def needs_scores_at(self, step, total_steps):
        return step >= int(self.config.triage_start * total_steps)

    def _stage_one(self, ppl, ent) -> tuple[object, torch.Tensor, torch.Tensor]:
        """Stage 1 on these samples: (the triage, kept rows bool [N], rows whose tokens Stage 2
        prunes bool [N]), with the ablations applied. Stage 1 runs in every mode, for its
        statistics; "token" keeps every sample, all pruned."""
        cfg = self.config
        decision = triage(ppl, ent, cfg.r_sample, reference=cfg.reference, keep_q1=cfg.keep_q1)
        kept = torch.zeros(decision.quadrant.numel(), dtype=torch.bool, device=decision.keep.device)
        kept[decision.keep] = True
        prune = decision.prune_tokens
        if cfg.stages == "token":
            kept = torch.ones_like(kept)
        if cfg.stages == "token" or cfg.prune_q4:
            prune = kept
        return decision, kept, prune

    def _prune(self, nll, response, rows, prune_rows, *, pool: int = 0, batch_keep: int | None = None) -> torch.Tensor:
        """Stage 2 on `rows` of a block of token NLLs: the masks of those rows. Under the pooled
        budget ("batch"), `batch_keep` response tokens survive over those rows; by default
        round(pool x r_sample x r_token), `pool` the response tokens the budget is taken from."""
        cfg = self.config
        if cfg.stages == "sample" or (cfg.reference and cfg.r_token == 1):
            return response[rows]  # the authors' code skips Stage 2 at r_token = 1
        budget = "batch" if cfg.reference else cfg.token_budget
        if budget == "batch" and batch_keep is None:
            batch_keep = round(pool * cfg.r_sample * cfg.r_token)
        return prune_tokens(token_perplexity(nll[rows]), response[rows], cfg.r_token, lam=cfg.lam,
                            neighbor=cfg.neighbor, edge=cfg.edge, budget=budget, rows=prune_rows[rows],
                            batch_keep=batch_keep, reverse=cfg.reversed_tokens, bridge=not cfg.reference)

    def select(self, batches, scores, step):
        if scores is None:  # a step before `triage_start`: random selection at the same budget
            decision = self._before_triage.select(batches, None, step)
            decision.stats["before_triage"] = True
            return decision
        if self.config.reference:
            return self._select_like_the_authors(batches, scores)
        clock = PhaseClock(scores[0].ppl.device)
        with clock.phase("triage"):
            decision, kept, prune = self._stage_one(torch.cat([s.ppl for s in scores]),
                                                    torch.cat([s.ent for s in scores]))
        selections = []
        with clock.phase("token_select"):
            for s, keep_rows, prune_rows in zip(scores, split_rows(kept, batches), split_rows(prune, batches)):
                rows = keep_rows.nonzero().flatten()
                mask = torch.zeros_like(s.response_mask)
                if rows.numel():
                    # The pooled budget counts every response token of the micro-batch.
                    mask[rows] = self._prune(s.nll, s.response_mask, rows, prune_rows,
                                             pool=int(s.response_mask.sum()))
                selections.append(Selection(rows, mask))
        stats = {"samples": decision.quadrant.numel(), **decision.counts(), "level": decision.level}
        return Decision.over(batches, selections, self.nominal_budget, stats, clock.seconds)

    def _select_like_the_authors(self, batches, scores) -> Decision:
        """Reference mode: what the authors' code does, micro-batch by micro-batch.

        Each micro-batch is triaged on its own (linear-interpolated quantiles and the other
        reference rules of `triage`); its pooled token budget is round(attended positions x
        r_sample x r_token), prompts included, so the kept rows' response tokens that survive are
        that minus the kept rows' prompt positions; Stage 2 is skipped at r_token = 1 and does not
        bridge neighbours across turns. The loss of each micro-batch is divided by the attended
        positions of its kept rows and the step averages the micro-batches: expressed here as the
        per-token weight K / (A_m x M) (K the step's kept tokens, the step's normaliser; A_m the
        kept rows' attended positions of micro-batch m; M the micro-batches), so that
        sum(w x CE) / K = mean over m of sum_m(CE) / A_m.
        """
        clock = PhaseClock(scores[0].ppl.device)
        selections, stats, levels = [], {}, []
        for batch, s in zip(batches, scores):
            with clock.phase("triage"):
                decision, kept, prune = self._stage_one(s.ppl, s.ent)
            with clock.phase("token_select"):
                rows = kept.nonzero().flatten()
                mask = torch.zeros_like(s.response_mask)
                if rows.numel():
                    attended = batch["attention_mask"].to(mask.device)
                    prompt = int(attended[rows].sum()) - int(s.response_mask[rows].sum())
                    keep = max(0, round(int(attended.sum()) * self.config.r_sample * self.config.r_token) - prompt)
                    mask[rows] = self._prune(s.nll, s.response_mask, rows, prune, batch_keep=keep)
                selections.append(Selection(rows, mask))
            for key, value in decision.counts().items():
                stats[key] = stats.get(key, 0) + value
            levels.append(decision.level)
        kept_tokens = sum(int(sel.label_mask[sel.rows].sum()) for sel in selections)
        for batch, sel in zip(batches, selections):
            positions = int(batch["attention_mask"][sel.rows.to(batch["attention_mask"].device)].sum())
            if positions:
                weight = kept_tokens / (positions * len(batches))
                sel.weights = torch.where(sel.label_mask, weight, 0.0).to(torch.float32)
        stats = {"samples": sum(int(s.ppl.numel()) for s in scores), **stats, "level": sum(levels) / len(levels)}
        return Decision.over(batches, selections, self.nominal_budget, stats, clock.seconds)

    def select_dataset(self, scores):
        """Triage over the whole dataset (the quantiles are the dataset's), then Stage 2 on the
        kept Q2 samples; needs the per-token scores (`score_dataset(..., per_token=True)`)."""
        if self.config.reference:
            raise QTuneError("static selection does not reproduce the authors' code (reference): it triages per "
                             "batch with entropy over attended positions, which a dataset's scores do not hold")
        if scores.token_nll is None:
            raise QTuneError("qtuning's static selection needs per-token scores (score with per_token=True)")
        cfg = self.config
        decision = triage(torch.tensor(scores.ppl), torch.tensor(scores.ent), cfg.r_sample, keep_q1=cfg.keep_q1)
        kept, prune = decision.keep, decision.prune_tokens
        if cfg.stages == "token":
            kept = torch.arange(len(scores.ppl))
        if cfg.stages == "token" or cfg.prune_q4:
            prune = torch.ones_like(prune)
        lengths = [scores.n_response[i] for i in kept.tolist()]
        width = max(lengths)
        nll = torch.zeros(len(lengths), width)
        for j, i in enumerate(kept.tolist()):
            nll[j, : lengths[j]] = torch.tensor(scores.token_nll[i])
        response = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        rows = torch.arange(len(lengths))
        masks = self._prune(nll, response, rows, prune[kept], pool=sum(scores.n_response))
        return DatasetSelection([scores.sample_id[i] for i in kept.tolist()],
                                {scores.sample_id[i]: masks[j, :lengths[j]].tolist()
                                 for j, i in enumerate(kept.tolist())})

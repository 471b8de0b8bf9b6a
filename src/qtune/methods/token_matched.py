"""`token_matched_random`: random samples and random tokens, as many loss tokens as a given fraction
F of each step's response tokens.

Why: Q-Tuning keeps its Q4 samples whole and prunes only the Q2 ones, so at the same nominal
budget (r_sample x r_token) it trains on more loss tokens than `random` (1.5 times as many at
r_token = 0.5 when half of its kept samples are Q4). Run at F =
Q-Tuning's measured loss-token fraction (`match_run`: its output folder), this control trains on
as many tokens as Q-Tuning did, chosen at random: the comparison then tells Q-Tuning's choice
from its token surplus. A control: it reads no labels, but needs F."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import TokenMatchedConfig
from ..errors import QTuneError
from ..pruning import keep_count
from .base import Decision, Method, Selection, register, response_mask_of, split_rows
from .random import step_generator


def measured_fraction(run: str) -> float:
    """The loss-token fraction a finished `qtune train` run measured: `loss_token_fraction` of its
    summary.json (kept loss tokens / response tokens, over every step)."""
    path = Path(run) / "summary.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["loss_token_fraction"]
    except (OSError, ValueError, KeyError, TypeError):
        value = None
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise QTuneError(f"--match-run {run}: no loss_token_fraction in (0, 1] in {path}; give the output folder of a "
                         "finished qtune train run, or --match-fraction")
    return float(value)


def samples_holding(lengths: torch.Tensor, minimum: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """bool [N]: the first k samples of a uniformly random order (one `randperm(N)`), k the
    smallest count >= `minimum` whose samples hold at least `tokens` response tokens together
    (`lengths`: int [N], each sample's), at most N."""
    order = torch.randperm(lengths.numel(), generator=generator)
    short = int((lengths[order].cumsum(0) < tokens).sum())  # leading prefixes that hold fewer
    chosen = torch.zeros(lengths.numel(), dtype=torch.bool)
    chosen[order[: max(minimum, short + 1)]] = True
    return chosen


def pooled_tokens(candidates: list[torch.Tensor], count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Masks of the shapes of `candidates` (bool tensors) holding `count` of their True positions
    (all of them when fewer), drawn uniformly without replacement over all of them together."""
    flat = torch.cat([c.flatten() for c in candidates])
    positions = flat.nonzero().flatten()
    keep = torch.zeros_like(flat)
    keep[positions[torch.randperm(positions.numel(), generator=generator)[:count]]] = True
    return [part.view_as(c) for part, c in zip(torch.split(keep, [c.numel() for c in candidates]), candidates)]


@register("token_matched_random")
class TokenMatchedRandom(Method):
    """Control: random samples and tokens, a set fraction of each step's response tokens (match_fraction/run)."""

    config_class = TokenMatchedConfig
    control = True

    def __init__(self, config):
        super().__init__(config)
        if config.match_fraction is not None:
            self.fraction = config.match_fraction
        elif config.match_run is not None:
            self.fraction = measured_fraction(config.match_run)
        else:
            raise QTuneError("token_matched_random needs the fraction of response tokens to keep: --match-fraction F, "
                             "or --match-run RUN (a finished run whose measured loss-token fraction it matches)")

    @property
    def nominal_budget(self) -> float:
        return self.fraction

    def select(self, batches, scores, step):
        """With R the step's response tokens and N its samples: T = max(1, round(F x R)) tokens, drawn
        uniformly among the response tokens of keep_count(r_sample, N) random samples, more random
        samples being added (in the same order) until they hold T. The draws depend only on (seed, step)."""
        generator = step_generator(self.config.seed, step)
        responses = [response_mask_of(b).cpu() for b in batches]
        lengths = torch.cat([r.sum(1) for r in responses])
        tokens = max(1, round(self.fraction * int(lengths.sum())))
        chosen = samples_holding(lengths, keep_count(self.config.r_sample, lengths.numel()), tokens, generator)
        rows = split_rows(chosen, batches)
        masks = pooled_tokens([r & kept[:, None] for r, kept in zip(responses, rows)], tokens, generator)
        selections = [Selection(kept.nonzero().flatten(), mask) for kept, mask in zip(rows, masks)]
        stats = {"samples": chosen.numel(), "kept": int(chosen.sum()), "target_tokens": tokens}
        return Decision.over(batches, selections, self.nominal_budget, stats)

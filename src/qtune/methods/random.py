"""`random`: uniformly random samples and, inside them, uniformly random response tokens, at
Q-Tuning's ratios (the control that tells whether Q-Tuning's choice beats chance)."""

from __future__ import annotations

import torch

from ..config import RandomConfig
from ..pruning import keep_count, prune_tokens
from .base import DatasetSelection, Decision, Method, Selection, register, response_mask_of, split_rows


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a method's draws at `step`: they depend only on (seed, step), so a resumed
    run repeats them."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def random_samples(n: int, r_sample: float, generator: torch.Generator) -> torch.Tensor:
    """bool [n]: `keep_count(r_sample, n)` samples drawn uniformly (one `randperm(n)` of `generator`)."""
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=generator)[: keep_count(r_sample, n)]] = True
    return chosen


def random_token_masks(response: torch.Tensor, r_token: float, generator: torch.Generator) -> torch.Tensor:
    """Keep `max(1, floor(r_token * n))` response tokens per row, uniformly at random: random scores
    with no neighbour term make `prune_tokens` keep a uniform random subset."""
    noise = torch.rand(response.shape, generator=generator).to(response.device)
    return prune_tokens(noise, response, r_token, lam=0.0)


@register("random")
class RandomPruning(Method):
    """Keeps `floor(r_sample * N)` samples of the step and `floor(r_token * n)` tokens in each.
    The draw depends only on (seed, step), so a resumed run repeats it; no state, no scores."""

    config_class = RandomConfig

    @property
    def nominal_budget(self) -> float:
        return self.config.r_sample * self.config.r_token

    def select(self, batches, scores, step):
        cfg = self.config
        generator = step_generator(cfg.seed, step)
        n = sum(b["labels"].shape[0] for b in batches)
        chosen = random_samples(n, cfg.r_sample, generator)
        selections = [Selection(kept.nonzero().flatten(), random_token_masks(response_mask_of(batch), cfg.r_token,
                                                                             generator))
                      for batch, kept in zip(batches, split_rows(chosen, batches))]
        return Decision.over(batches, selections, self.nominal_budget, {"samples": n, "kept": int(chosen.sum())})

    def select_dataset(self, scores):
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        n = len(scores.sample_id)
        kept = sorted(torch.randperm(n, generator=generator)[: keep_count(cfg.r_sample, n)].tolist())
        lengths = [scores.n_response[i] for i in kept]
        response = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
        masks = random_token_masks(response, cfg.r_token, generator)
        return DatasetSelection([scores.sample_id[i] for i in kept],
                                {scores.sample_id[i]: masks[j, :lengths[j]].tolist() for j, i in enumerate(kept)})

"""SFT inside RL: the maths of `qtune rl --sft-weight` (CHORD) and `--interleave-sft` (ReLIFT), as
plain functions of tensors and lists, testable without a model. `QTuneGRPOTrainer` applies them;
docs/rl.md ("SFT inside RL") has the citations, options, costs and deviations.

CHORD (Zhang et al. 2025, arXiv 2508.11408) adds an SFT loss on expert demonstrations to every
GRPO micro-batch:

    L = (1 - mu_t) L_grpo + mu_t L_sft,    L_sft = sum_i phi_i (-log p_i) / n

over the n expert tokens i of the micro-batch (p_i the current policy's probability of expert token
i, `expert_token_nll`), with phi_i = 1 (`--sft-token-weight none`, the paper's CHORD-mu) or
phi_i = sg(p_i (1 - p_i)) (`p(1-p)`, CHORD-phi: largest for the tokens the policy is unsure of,
vanishing for those it already predicts or finds implausible; sg: treated as a constant, so the
gradient with respect to the logits is phi_i (softmax - onehot) / n). mu_t (`sft_weight_at`) is
constant or decays from the peak W to a floor by a half cosine over the decay steps, then stays.

ReLIFT (Ma et al. 2025, arXiv 2506.07527) collects the questions that RL cannot learn from because
every rollout of their group is wrong (`all_wrong_groups`), buffers their reference solutions, and
when the buffer holds enough takes one separate optimizer step on their negative log-likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data import IGNORE_INDEX
from ..rewards import parse_spec

#: How mu moves over the run: "constant" (mu = W) or "decay" (W to the floor, half cosine).
SCHEDULES = ("constant", "decay")
#: The expert tokens' weights phi: "none" (1, plain NLL) or "p(1-p)" (CHORD-phi).
TOKEN_WEIGHTS = ("none", "p(1-p)")


@dataclass(frozen=True)
class SFTMix:
    """The SFT terms of a run (`qtune.rl.RLConfig`'s sft_* and interleave_sft* options):
    `weight` W (0: no SFT term), `schedule`, `floor`, `decay_steps` (None: the whole run),
    `token_weight`; `interleave`, `interleave_batch` (records that trigger an SFT step) and
    `correctness` (the position, in the run's rewards, of the reward whose value <= 0 marks a
    wrong rollout)."""

    weight: float = 0.0
    schedule: str = "constant"
    floor: float = 0.05
    decay_steps: int | None = None
    token_weight: str = "none"
    interleave: bool = False
    interleave_batch: int = 64
    correctness: int = 0

    @classmethod
    def of(cls, cfg) -> SFTMix:
        """The SFT terms of an `RLConfig`."""
        names = [parse_spec(spec)[0] for spec in cfg.rewards]
        correctness = names.index(cfg.interleave_sft_reward) if cfg.interleave_sft_reward in names else 0
        return cls(cfg.sft_weight, cfg.sft_weight_schedule, cfg.sft_weight_floor, cfg.sft_weight_decay_steps,
                   cfg.sft_token_weight, cfg.interleave_sft, cfg.interleave_sft_batch, correctness)

    @property
    def active(self) -> bool:
        """Whether the run needs expert demonstrations."""
        return self.weight > 0 or self.interleave

    def weight_at(self, step: int, max_steps: int) -> float:
        """mu of optimizer step `step` (0 for the first) of a run of `max_steps` steps."""
        return sft_weight_at(step, self.weight, self.schedule, self.floor,
                             self.decay_steps if self.decay_steps is not None else max_steps)


def sft_weight_at(step: int, weight: float, schedule: str, floor: float, decay_steps: int) -> float:
    """mu_t, the SFT share of the loss at optimizer step t = `step` (0 for the first):

        constant   mu_t = W
        decay      mu_t = floor + (W - floor) (1 + cos(pi min(t, T) / T)) / 2,   T = decay_steps

    so the decay starts at W, falls fastest half-way and holds the floor from step T on."""
    if schedule == "constant":
        return weight
    if schedule != "decay":
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    progress = min(step, decay_steps) / max(decay_steps, 1)
    return floor + (weight - floor) * (1 + math.cos(math.pi * progress)) / 2


def expert_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p of every labelled next token, float32: logits [B, T, V] predict labels [B, T]
    shifted by one (position t predicts label t + 1); positions whose label is IGNORE_INDEX
    (prompt, padding) are left out. Returns the n labelled tokens' values [n], in order."""
    targets = labels[:, 1:]
    kept = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[:, :-1][kept].float(), targets[kept], reduction="none")


def token_weights(nll: torch.Tensor, kind: str) -> torch.Tensor:
    """phi of each token, detached: 1 ("none") or p (1 - p) with p = exp(-nll) ("p(1-p)")."""
    if kind == "none":
        return torch.ones_like(nll)
    if kind != "p(1-p)":
        raise ValueError(f"unknown token weight {kind!r}; choose one of {', '.join(TOKEN_WEIGHTS)}")
    p = torch.exp(-nll.detach())
    return p * (1 - p)


def weighted_nll_sum(nll: torch.Tensor, kind: str) -> torch.Tensor:
    """sum_i phi_i nll_i over the tokens (`token_weights`); differentiable in `nll` only."""
    return (token_weights(nll, kind) * nll).sum()


def chord_loss(grpo_loss: torch.Tensor, sft_loss: torch.Tensor, mu: float) -> torch.Tensor:
    """CHORD's mixture (1 - mu) L_grpo + mu L_sft."""
    return (1 - mu) * grpo_loss + mu * sft_loss


def all_wrong_groups(correctness: torch.Tensor, sample_ids: list[int]) -> list[int]:
    """The sample ids of the groups whose every rollout is wrong: correctness [P, G] holds the
    correctness reward of each rollout of each prompt's group (P groups, in the order of
    `sample_ids`); a rollout is wrong when that reward is <= 0 (exact_match's 0), right when it
    is > 0, unknown when NaN (the reward did not apply). A group is all wrong when every rollout is
    known and wrong: an all-right group, a mixed one or one with an unknown rollout is not."""
    if correctness.shape[0] != len(sample_ids):
        raise ValueError(f"{correctness.shape[0]} groups of rewards for {len(sample_ids)} sample ids")
    wrong = (correctness <= 0).all(dim=1)  # NaN <= 0 is False: an unknown rollout is not wrong
    return [s for s, w in zip(sample_ids, wrong.tolist()) if w]


def expert_positions(count: int, size: int, draw: int, seed: int) -> list[int]:
    """The positions (into `count` demonstrations) of draw number `draw` of `size` of them: the
    draws walk through one random order of all demonstrations after another (epoch e's order is
    `torch.randperm(count)` seeded with seed + e), so every demonstration comes once per epoch and
    draw k is the same whenever it is asked for (a resumed run draws what the first run drew)."""
    positions, orders = [], {}
    for j in range(draw * size, (draw + 1) * size):
        epoch, offset = divmod(j, count)
        if epoch not in orders:
            orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        positions.append(orders[epoch][offset])
    return positions


def process_share(ids: list[int], world_size: int, rank: int, micro_batch: int) -> list[list[int]]:
    """Process `rank`'s micro-batches of `ids` (every world_size-th one, from its rank), cut into
    lists of at most `micro_batch`; every process gets the same number of them (that of the largest
    share), so that each takes part in every gradient reduction: a share that runs out gets empty
    micro-batches."""
    share = ids[rank::world_size]
    largest = math.ceil(len(ids) / world_size)
    return [share[k:k + micro_batch] for k in range(0, max(largest, 1), micro_batch)]


__all__ = ["SCHEDULES", "TOKEN_WEIGHTS", "SFTMix", "all_wrong_groups", "chord_loss", "expert_positions",
           "expert_token_nll", "process_share", "sft_weight_at", "token_weights", "weighted_nll_sum"]

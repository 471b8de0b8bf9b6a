"""Token objectives other than the negative log-likelihood (`--loss`), combinable with any method.

The gold-token objectives (`GOLD_OBJECTIVES`) are functions f of the gold token's log-probability
l = log p (float32, one value per kept token); the step's loss is sum(weight x f(l)) over the kept
tokens / the step's kept tokens, exactly as for NLL (`qtune.step.micro_batch_loss`).

    nll          -l                          the default
    dft          -sg(p) l                    DFT (Wu et al. 2025, arXiv 2508.05629): NLL weighted by
                                             the detached probability
    prob         (1 - p^a) / a               the probability family of "Beyond Log Likelihood"
                                             (Li et al. 2025, arXiv 2510.00526); a = 1 is "-p"
                                             (as 1 - p), a = 10 is "-p^10", a -> 0 recovers NLL
    top_p        (1 - p) 1[p >= q]           that paper's thresholded variants: a token whose
    bottom_p     (1 - p) 1[p <= q]           detached p fails the threshold q gets no loss
    top_logp     -l 1[p >= q]
    bottom_logp  -l 1[p <= q]

For logits z and p = softmax(z), dl/dz = onehot - p, so the gradient of any f(l) with respect to
the logits is -f'(l) (p - onehot): cross-entropy's gradient with the per-token weight -f'(l).
`value_and_weight` returns that weight, which lets the chunked loss (`qtune.head`) compute every
objective's gradient inside its chunks as it does for NLL.

One difference from that paper: the thresholded variants divide by the step's kept tokens (the
normaliser of every method and objective here, known before the forward), not by the tokens past
the threshold, which only the forward knows. The gradient's direction is the same; its size is
smaller by the share of tokens past the threshold.

Three objectives need more than l (docs/methods.md, Objectives, has their citations and costs):

    eaft   -w l,  w = sg(H_K / ln K)^a      EAFT (Diao et al. 2026, arXiv 2601.02151): H_K the
                                            entropy of the softmax over the K largest logits
                                            (`entropy_weights`), K = top_k, a = alpha
    psft   -min(r, 1 + eps),  r = p / p_old  PSFT (Zhu et al. 2025, arXiv 2508.17784): PPO's clipped
                                            ratio with advantage 1 against the policy before the
                                            update (`proximal_value_and_weight`), eps = clip
    asft   -sg(p) l + lambda KL(q || p_all)  ASFT (Zhu et al. 2025, arXiv 2509.23753): DFT plus a KL
                                            anchor to the base model's distribution q over the
                                            vocabulary, lambda = kl_weight

EAFT's and PSFT's gradients are still cross-entropy's weighted per token (by w, and by
r 1[r < 1 + eps]), weights that need the logits' top K or p_old: the step computes them before the
loss (`qtune.step`). ASFT's KL term has the gradient lambda (p - q) with respect to the logits,
which no per-token weight gives: it is a second chunked term (`qtune.loss_terms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OBJECTIVES = ("nll", "dft", "prob", "top_p", "bottom_p", "top_logp", "bottom_logp", "asft", "psft", "eaft")
#: The objectives that are a function of the gold token's log-probability alone.
GOLD_OBJECTIVES = OBJECTIVES[:7]


@dataclass(frozen=True)
class Objective:
    """A token objective by name (see the module doc); `alpha` for "prob" and "eaft", `threshold` (q,
    a probability) for the thresholded ones, `clip` (eps) and `window` (optimizer steps between two
    refreshes of the old policy) for "psft", `kl_weight` (lambda) for "asft", `top_k` (K) for "eaft"."""

    name: str = "nll"
    alpha: float = 1.0
    threshold: float = 0.5
    clip: float = 0.28
    window: int = 8
    kl_weight: float = 0.1
    top_k: int = 20

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; choose one of {', '.join(OBJECTIVES)}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, not {self.alpha}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], not {self.threshold}")
        if not self.clip > 0 or self.window < 1 or self.kl_weight < 0 or self.top_k < 2:
            raise ValueError(f"need clip > 0, window >= 1, kl_weight >= 0 and top_k >= 2, not {self.clip}, "
                             f"{self.window}, {self.kl_weight} and {self.top_k}")

    @classmethod
    def of(cls, options) -> Objective:
        """The objective of a config with the fields of `qtune.config.LossConfig`."""
        return cls(options.loss, alpha=options.loss_alpha, threshold=options.loss_threshold, clip=options.loss_clip,
                   window=options.loss_window, kl_weight=options.loss_kl_weight, top_k=options.loss_top_k)

    @property
    def is_nll(self) -> bool:
        return self.name == "nll"

    @property
    def gold(self) -> Objective:
        """The gold-token part, which the head's chunked cross-entropy computes: DFT for ASFT, NLL (to
        be weighted per token) for EAFT and PSFT, the objective itself otherwise."""
        part = {"asft": "dft", "psft": "nll", "eaft": "nll"}.get(self.name)
        return self if part is None else Objective(part)

    @property
    def reference(self) -> str | None:
        """The other policy the objective compares with: "base" (ASFT: the model training started
        from), "old" (PSFT: the weights at the start of the current window), or None."""
        return {"asft": "base", "psft": "old"}.get(self.name)

    def __call__(self, logp: torch.Tensor) -> torch.Tensor:
        """f(l) per token, differentiable in `logp` (the gold token's log-probability); gold-token
        objectives only."""
        if self.name not in GOLD_OBJECTIVES:
            raise ValueError(f"{self.name} is not a function of the gold token's probability alone")
        p = logp.detach().exp()
        if self.name == "nll":
            return -logp
        if self.name == "dft":
            return -p * logp
        if self.name == "prob":
            return (1 - torch.exp(self.alpha * logp)) / self.alpha
        passes = p >= self.threshold if self.name.startswith("top") else p <= self.threshold
        value = -logp if self.name.endswith("logp") else 1 - logp.exp()
        return torch.where(passes, value, torch.zeros_like(value))

    def value_and_weight(self, nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(l), -f'(l)) for the tokens' cross-entropies `nll` = -l, both detached: the loss value
        and the weight that turns cross-entropy's gradient into f's."""
        logp = (-nll.detach().float()).requires_grad_()
        with torch.enable_grad():
            value = self(logp)
            (slope,) = torch.autograd.grad(value.sum(), logp)
        return value.detach(), -slope


def entropy_weights(logits: torch.Tensor, top_k: int, alpha: float) -> torch.Tensor:
    """EAFT's weight of each row of `logits` [n, V], detached, float32: (H_K / ln K)^alpha, H_K the
    entropy of the softmax over the row's K = min(top_k, V) largest logits (in [0, ln K])."""
    k = min(top_k, logits.shape[-1])
    logp = torch.log_softmax(logits.detach().float().topk(k, dim=-1).values, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return (entropy / math.log(k)).clamp(0, 1).pow(alpha)


def proximal_value_and_weight(logp: torch.Tensor, logp_old: torch.Tensor,
                              clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PSFT per token, detached: (f, -df/dl) with f = -min(r, clip(r, 1 - eps, 1 + eps)) = -min(r, 1 + eps),
    r = exp(l - l_old) (PPO's clipped objective with advantage 1: the lower clip never binds). The
    weight -df/dl = r where r < 1 + eps, else 0, turns cross-entropy's gradient into f's."""
    ratio = torch.exp(logp.detach().float() - logp_old.detach().float())
    return -ratio.clamp(max=1 + clip), torch.where(ratio < 1 + clip, ratio, torch.zeros_like(ratio))

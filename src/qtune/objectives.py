"""Token objectives other than the negative log-likelihood (`--loss`), combinable with any method.

Each objective is a function f of the gold token's log-probability l = log p (float32, one value
per kept token); the step's loss is sum(weight x f(l)) over the kept tokens / the step's kept
tokens, exactly as for NLL (`qtune.step.micro_batch_loss`).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OBJECTIVES = ("nll", "dft", "prob", "top_p", "bottom_p", "top_logp", "bottom_logp")


@dataclass(frozen=True)
class Objective:
    """A token objective by name (see the module doc); `alpha` for "prob", `threshold` (q, a
    probability) for the thresholded ones."""

    name: str = "nll"
    alpha: float = 1.0
    threshold: float = 0.5

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; choose one of {', '.join(OBJECTIVES)}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, not {self.alpha}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], not {self.threshold}")

    @property
    def is_nll(self) -> bool:
        return self.name == "nll"

    def __call__(self, logp: torch.Tensor) -> torch.Tensor:
        """f(l) per token, differentiable in `logp` (the gold token's log-probability)."""
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

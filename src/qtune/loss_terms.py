"""What the token objectives need from the logits besides the gold token's cross-entropy
(`qtune.objectives`), computed from the hidden states at the head's input a chunk of positions at a
time, so that memory stays flat in the vocabulary as in `qtune.head`:

- `chunked_entropy_weights`: EAFT's per-token weight from each position's top-K logits (no gradient:
  the weight is detached by definition). One [chunk_tokens x V] float32 block at a time; costs one
  more projection of the kept positions onto the vocabulary (a no-grad matrix product).
- `linear_kl_divergence`: ASFT's anchor, sum_i w_i KL(q_i || p_i) between the reference
  distribution q_i = softmax(W' h'_i + b') (the base model's, no gradient) and the trained one
  p_i = softmax(W h_i + b), with its gradient computed in the forward as `qtune.head` does for the
  cross-entropy: dKL/dz = p - q for the trained logits z, so g = w (p - q) per chunk gives
  dh = g W, dW += g^T h, db += sum g. Peak extra memory: three [chunk_tokens x V] float32 blocks
  (both logits and q), and the gradients of the hidden states and of the head's weight. Costs two
  projections onto the vocabulary (trained and reference) and the two gradient products, about as
  much as the head's own chunked cross-entropy again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .head import full_parameters, working_block
from .objectives import entropy_weights


@torch.no_grad()
def chunked_entropy_weights(hidden: torch.Tensor, head: torch.nn.Linear, *, top_k: int, alpha: float,
                            chunk_tokens: int | None) -> torch.Tensor:
    """float32 [n]: `entropy_weights` of the logits head(hidden) for hidden states [n, d], a working
    block of positions at a time (`qtune.head.working_block`; a sharded head gathered)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with full_parameters(head) as (weight, bias):
        rows, _ = working_block(hidden.shape[0], hidden.shape[1], weight.shape[0], chunk_tokens)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            out[part] = entropy_weights(F.linear(hidden[part].detach(), weight, bias), top_k, alpha)
    return out


def kl_and_gradient(logits: torch.Tensor, reference_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(q || p) per row, its gradient p - q with respect to `logits`) for float32 logits [n, V] (p)
    and the reference's (q), both detached. Both are overwritten (`logits` becomes p - q): with q,
    three [n x V] blocks in all."""
    log_q = reference_logits.sub_(torch.logsumexp(reference_logits, dim=-1, keepdim=True))
    log_p = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    q = log_q.exp()
    # q (log q - log p) is 0 where the reference masks a token (q = 0, log q = -inf: 0 x -inf is nan).
    kl = log_q.sub_(log_p).mul_(q).nan_to_num_(nan=0.0).sum(dim=-1)
    return kl, log_p.exp_().sub_(q)


class _ChunkedLinearKL(torch.autograd.Function):
    """sum_i w_i KL(softmax(ref_i) || softmax(hidden_i @ weight.T + bias)), ref_i = the reference's logits
    of position i (computed here from its hidden states and head, without gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, token_weight, chunk_tokens):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                     if needs_bias and bias is not None else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            h = hidden[part]
            logits = F.linear(h, weight, bias).float()
            reference = F.linear(ref_hidden[part], ref_weight, ref_bias).float()
            kl, grad_logits = kl_and_gradient(logits, reference)
            w = None if token_weight is None else token_weight[part].float()
            total += kl.sum() if w is None else (kl * w).sum()
            if not (needs_hidden or needs_weight or needs_bias):
                continue
            if w is not None:
                grad_logits.mul_(w[:, None])
            g = grad_logits.to(hidden.dtype)
            if needs_hidden:
                grad_hidden[part] = g @ weight
            if needs_weight:
                grad_weight.addmm_(g.t(), h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        ctx.save_for_backward(*(x for x in (grad_hidden, grad_weight, grad_bias) if x is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (next(saved) if has else None for has in ctx.has)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_total.to(grad_weight.dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def linear_kl_divergence(hidden: torch.Tensor, head: torch.nn.Linear, ref_hidden: torch.Tensor,
                         ref_head: torch.nn.Linear, token_weight: torch.Tensor | None = None, *,
                         chunk_tokens: int | None) -> torch.Tensor:
    """Summed KL(q_i || p_i) over positions (each weighted by `token_weight` when given), float32,
    p_i = softmax(head(hidden_i)) differentiable in the hidden states [n, d] and the head's parameters,
    q_i = softmax(ref_head(ref_hidden_i)) a constant, without the [n x V] logits of either: a working
    block of positions at a time (`qtune.head.working_block`). A sharded head is gathered around it
    (`qtune.head.full_parameters`): the gradients are computed in the forward, while it is whole."""
    with full_parameters(head) as (weight, bias):
        rows, _ = working_block(hidden.shape[0], hidden.shape[1], weight.shape[0], chunk_tokens)
        return _ChunkedLinearKL.apply(hidden, weight, bias, ref_hidden.detach(), ref_head.weight.detach(),
                                      None if ref_head.bias is None else ref_head.bias.detach(), token_weight, rows)

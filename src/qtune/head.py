"""The output projection (the model's head) applied a chunk of positions at a time, so that
neither the scoring pass nor the training loss ever holds a [tokens x vocabulary] tensor.

A causal LM is a body (embeddings, decoder layers, final norm) followed by a head, a linear map
from the hidden size d to the vocabulary V. With 150k-token vocabularies the head's output is
the largest tensor of a step (8 x 2,048 positions x 152k x 4 bytes = 10 GB in float32), while
the body's last hidden states are V/d times smaller. `head_forward` runs the model as usual
(through any DDP wrapper or PEFT adapter) but takes the hidden states at the head's input and
lets the head project a single position; the caller then projects the hidden states itself:

- scoring (`scoring.chunked_token_statistics`, no gradient): gold-token NLL and entropy,
  `chunk_tokens` positions at a time. Peak extra memory: one [chunk_tokens x V] float32 block and its exp.
- training (`linear_cross_entropy`): the summed (optionally weighted) cross-entropy and its
  gradients, computed together in the forward, chunk by chunk (the gradient of the
  cross-entropy with respect to the logits is softmax - one-hot, so it needs no second pass);
  the backward only scales them. Peak extra memory: one [chunk_tokens x V] float32 block, the
  gradient of the hidden states [n x d] and that of the head's weight [V x d] (the size of the
  gradient autograd would give it). On CUDA with Liger Kernel installed, its fused linear
  cross-entropy does the same in Triton.

`head_impl` chooses: "logits" (the model computes the logits of the needed positions; the
historical path), "chunked", "liger" (CUDA and the `liger-kernel` package; unweighted losses
only) or "auto" (chunked: on an H200 with a Qwen2-0.5B shape it measured 103 ms per loss forward
and backward against Liger's 128 ms, for 240 MB more memory; docs/performance.md). A model whose
head cannot be split off (not a plain `nn.Linear`, such as a LoRA-adapted head, or a sharded one
under FSDP / ZeRO-3), or that changes its logits after the head (soft-capping, a logit scale;
detected by comparing the one position the model projects itself with ours), uses the logits
path after a one-line notice.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
import torch.nn.functional as F

from .console import log
from .errors import QTuneError
from .models import base_model
from .objectives import Objective

HEAD_IMPLS = ("auto", "chunked", "liger", "logits")

#: Models already known to need the logits path, and why (once per model, one notice).
_UNSPLITTABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Models whose split was checked against their own projection of one position.
_CHECKED: weakref.WeakSet = weakref.WeakSet()


def accepts_logits_to_keep(model) -> bool:
    """Whether `model.forward` can return logits for a boolean mask of positions
    (transformers >= 5 models); others get the full-logits path."""
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def liger_available() -> bool:
    """Whether Liger Kernel's fused linear cross-entropy can be imported."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except ImportError:
        return False
    return True


def _split_refusal(model) -> str | None:
    """Why the head of `model` cannot be applied outside the model, or None when it can."""
    base = base_model(model)
    if base in _UNSPLITTABLE:
        return _UNSPLITTABLE[base]
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"its output projection is {type(head).__name__}, not a plain Linear layer"
    weight = head.weight
    if weight.dim() != 2 or weight.numel() == 0 or type(weight).__name__ == "DTensor":
        return "its output projection's weight is sharded (FSDP or ZeRO-3)"
    config = getattr(base, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"it transforms its logits after the projection ({name})"
    return None


def _refuse(base, reason: str) -> None:
    """Send `base` to the logits path from now on, with a one-line notice the first time."""
    if base not in _UNSPLITTABLE:
        _UNSPLITTABLE[base] = reason
        log(f"notice: {type(base).__name__}: {reason}; computing full logits (memory grows with the vocabulary)")


def resolve_head_impl(model, head_impl: str, *, weighted: bool = False, scoring: bool = False) -> str:
    """The head path that runs for `model`: "logits", "chunked" or "liger" ("auto" is chunked).

    weighted: the loss has per-token weights (Liger's fused loss takes none). scoring: the
    entropy is needed too (only the chunked path computes it); both keep "liger" chunked. A
    refused split gives "logits" with a one-line notice, once per model; "liger" where it cannot
    run (no CUDA, no liger-kernel) is a `QTuneError`.
    """
    if head_impl not in HEAD_IMPLS:
        raise ValueError(f"head_impl must be one of {HEAD_IMPLS}, not {head_impl!r}")
    if head_impl == "logits":
        return "logits"
    reason = ("its forward takes no logits_to_keep mask" if not accepts_logits_to_keep(model)
              else _split_refusal(model))
    if reason is not None:
        _refuse(base_model(model), reason)
        return "logits"
    if head_impl == "liger":
        device = base_model(model).get_output_embeddings().weight.device
        if device.type != "cuda" or not liger_available():
            raise QTuneError("--head-impl liger needs a model on a CUDA device and the liger-kernel package "
                             "(pip install liger-kernel); --head-impl chunked saves the same memory anywhere")
        # Liger computes no entropy and takes no per-token weight: those passes stay chunked.
        return "chunked" if scoring or weighted else "liger"
    return "chunked"


@contextlib.contextmanager
def _capture_head_input(head: torch.nn.Linear, captured: dict):
    """While active, the head receives only the first of its input positions (so that the
    model's own projection of it can be compared with ours); the full input lands in
    `captured["hidden"]`."""

    def keep_one(module, args):
        hidden = args[0]
        captured["hidden"] = hidden
        return (hidden.narrow(-2, 0, min(1, hidden.shape[-2])), *args[1:])

    handle = head.register_forward_pre_hook(keep_one)
    try:
        yield
    finally:
        handle.remove()


def head_forward(model, inputs: dict, keep: torch.Tensor):
    """Run `model(**inputs, logits_to_keep=keep)` and return `(outputs, hidden, head)`:
    the hidden states at the head's input for the True positions of `keep` ([n, d], in
    row-major order), and the head layer. None when the model changes its logits after the head
    (found on its first call; the caller then takes the logits path, and later calls go there).
    """
    base = base_model(model)
    head = base.get_output_embeddings()
    captured: dict = {}
    with _capture_head_input(head, captured):
        outputs = model(**inputs, logits_to_keep=keep)
    hidden = captured["hidden"]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if base not in _CHECKED and hidden.shape[0] > 0:
        with torch.no_grad():
            ours = F.linear(hidden[:1], head.weight, head.bias).float()
            theirs = outputs.logits.reshape(-1, outputs.logits.shape[-1])[:1].float()
        tolerance = 1e-4 if ours.dtype == head.weight.dtype else 1e-2
        if theirs.shape != ours.shape or not torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance):
            _refuse(base, "its logits differ from its output projection (it transforms them after the head)")
            return None
        _CHECKED.add(base)
    return outputs, hidden, head


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T + bias, target_i), gradients computed in the forward.

    For logits z = W h + b and p = softmax(z): dCE/dz = p - onehot(target), so per chunk
    g = w * (p - onehot) gives dh = g W, dW += g^T h and db += sum g. The backward multiplies
    them by the incoming gradient (a scalar). With an `objective` other than NLL the sum is of
    w_i * f(-CE_i), and each token's gradient weight is w_i * (-f') (`qtune.objectives`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, chunk_tokens, objective):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # In the weight's dtype, as autograd's own gradient: addmm_ adds each chunk's product with
        # float32 accumulation inside the matrix product, and no float32 [V x d] copy is needed.
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                     if needs_bias and bias is not None else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            h, t = hidden[part], target[part]
            logits = F.linear(h, weight, bias).float()
            log_total = torch.logsumexp(logits, dim=-1)
            token_loss = log_total - logits.gather(1, t[:, None]).squeeze(1)
            w = None if token_weight is None else token_weight[part].float()
            if objective is not None:
                token_loss, slope = objective.value_and_weight(token_loss)
            total += token_loss.sum() if w is None else (token_loss * w).sum()
            if objective is not None:  # the gradient's weight: the token's times the objective's slope
                w = slope if w is None else w * slope
            if not (needs_hidden or needs_weight or needs_bias):
                continue
            grad_logits = logits.sub_(log_total[:, None]).exp_()  # softmax, in the logits' memory
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
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
        grads = [next(saved) if has else None for has in ctx.has]
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_total.to(grad_weight.dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, target: torch.Tensor,
                         token_weight: torch.Tensor | None = None, *, chunk_tokens: int,
                         impl: str = "chunked", objective: Objective | None = None) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` [n, d] against `target` [n] (each weighted by
    `token_weight` when given), in float32, differentiable in the hidden states and the head's
    parameters, without the [n x V] logits. `impl`: "chunked" or "liger" (unweighted NLL only).
    `objective`: another token objective than NLL (`qtune.objectives`), chunked only."""
    if objective is not None and objective.is_nll:
        objective = None
    if impl == "liger":
        if objective is not None:
            raise ValueError("the Liger loss computes NLL only")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        if token_weight is not None:
            raise ValueError("the Liger loss takes no per-token weights")
        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, target, head.bias).float()
    if impl != "chunked":
        raise ValueError(f"impl must be 'chunked' or 'liger', not {impl!r}")
    return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, head.bias, target, token_weight, chunk_tokens,
                                            objective)

"""The output projection (the model's head) applied a block at a time, so that neither the
scoring pass nor the training loss ever holds a [tokens x vocabulary] tensor, whether the head's
weight is whole or sharded (FSDP2, DeepSpeed ZeRO-3).

A causal LM is a body (embeddings, decoder layers, final norm) followed by a head, a linear map
from the hidden size d to the vocabulary V. With 150k-token vocabularies the head's output is
the largest tensor of a step (8 x 2,048 positions x 152k x 4 bytes = 10 GB in float32), while
the body's last hidden states are V/d times smaller. `head_forward` runs the model as usual
(through any DDP or FSDP2 wrapper, ZeRO-3 engine or PEFT adapter) but takes the hidden states at
the head's input and lets the head project a single position; the caller then projects the
hidden states itself, a working block at a time (`working_block`):

- scoring (`scoring.chunked_token_statistics`, no gradient): gold-token NLL and entropy, a block
  of rows x columns at a time; over a large vocabulary the statistics accumulate across blocks of
  columns (an online softmax), so the block's size follows the work, not the vocabulary.
- training (`linear_cross_entropy`): the summed (optionally weighted) cross-entropy and its
  gradients, computed together in the forward, a chunk of whole rows at a time (the gradient of
  the cross-entropy with respect to the logits is softmax - one-hot, so it needs no second pass);
  the backward only scales them. Peak extra memory: one [rows x V] float32 block, the gradient of
  the hidden states [n x d] and that of the head's weight [V x d] (the size of the gradient
  autograd would give it). On CUDA with Liger Kernel installed, its fused linear cross-entropy
  does the same in Triton.

A sharded head is gathered around that work (`full_parameters`) and its gradient returns to the
shards through the engine's own reduction: FSDP2 unshards the group that owns the head
(`FSDPModule.unshard`, when it resharded after the model's forward) and the gradient accumulates
into the unsharded parameter, which FSDP2 reduce-scatters at the end of the backward; ZeRO-3
gathers with `GatheredParameters` and its per-parameter hook reduce-scatters the gradient when
autograd accumulates it. Both are correct only because the gradients are computed in the forward,
while the weight is whole: the backward needs no weight.

`head_impl` chooses: "logits" (the model computes the logits of the needed positions; the
historical path), "chunked", "liger" (CUDA and the `liger-kernel` package; unweighted losses
only) or "auto" (chunked: on an H200 with a Qwen2-0.5B shape it measured 103 ms per loss forward
and backward against Liger's 128 ms, for 240 MB more memory; docs/performance.md). A model whose
head cannot be split off (not a plain `nn.Linear`, such as a LoRA-adapted head, or one whose
weight FSDP1 flattened into its shards), or that changes its logits after the head (soft-capping,
a logit scale; detected by comparing the one position the model projects itself with ours), uses
the logits path after a one-line notice.
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

try:  # FSDP2 (torch >= 2.6); a build without torch.distributed has no sharded head to meet
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:
    FSDPModule = DTensor = None

HEAD_IMPLS = ("auto", "chunked", "liger", "logits")

#: The fewest positions a chunk projects at once (when there are as many): the fixed chunk of
#: earlier versions, so that no matrix product is smaller than it was. Each chunk's product reads
#: the whole [V x d] weight, so a product of few rows is bound by that read (on a CPU, chunks of 8
#: or 32 rows were clearly slower than 128 in a rough run; bench/head_block.py compares the rule).
MIN_CHUNK_ROWS = 128
#: The smallest working block, in elements (8 MiB in float32): below it memory is no concern and
#: the overhead of more, smaller blocks (more, shorter operations) is.
MIN_BLOCK_ELEMENTS = 1 << 21

#: Models already known to need the logits path, and why (once per model, one notice).
_UNSPLITTABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Models whose split was checked against their own projection of one position.
_CHECKED: weakref.WeakSet = weakref.WeakSet()
#: The FSDP2 module whose parameter group holds each head seen by `head_forward` (None: no FSDP2).
_FSDP_OWNER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _power_of_two_at_most(value: int) -> int:
    """The largest power of two <= `value` (0 for 0)."""
    return 1 << (value.bit_length() - 1) if value > 0 else 0


def working_block(positions: int, hidden_size: int, vocab: int, chunk_tokens: int | None = None, *,
                  split_vocabulary: bool = False) -> tuple[int, int]:
    """(rows, columns) of the head's working block: how many of `positions` hidden states are
    projected at once, onto how many of the `vocab` entries.

    `chunk_tokens` None (auto): as Liger Kernel's fused linear cross-entropy sizes its chunks, a
    block's logits may take about as much memory as the hidden states they come from, positions x
    hidden_size elements (at least MIN_BLOCK_ELEMENTS), so that the head's memory follows the work
    and not the vocabulary. Rows: that budget over the vocabulary, rounded down to a power of two
    (the budget is a ceiling), but at least MIN_CHUNK_ROWS (fewer would make the products slow).
    Where those rows' logits exceed the budget (a large vocabulary, a small batch),
    `split_vocabulary` (scoring, whose statistics accumulate over blocks of columns) gives columns:
    the budget over the rows, rounded down to a power of two. The loss keeps whole rows (its
    gradient needs each row's normaliser before any of the row's columns: splitting would compute
    every logit twice): where the budget gives fewer than MIN_CHUNK_ROWS rows, its block is
    MIN_CHUNK_ROWS x vocab, as with the fixed chunk.

    An explicit `chunk_tokens`: that many rows of the whole vocabulary (the fixed chunk of earlier
    versions, 128 by default then).
    """
    if chunk_tokens is not None:
        return max(1, min(chunk_tokens, positions)), vocab
    budget = max(positions * hidden_size, MIN_BLOCK_ELEMENTS)
    rows = max(1, min(max(_power_of_two_at_most(budget // vocab), MIN_CHUNK_ROWS), positions))
    columns = vocab
    if split_vocabulary and rows * vocab > budget:
        columns = _power_of_two_at_most(budget // rows)
    return rows, columns


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


def _is_plain_linear(head) -> bool:
    """Whether `head` is a `torch.nn.Linear` as it comes, or as FSDP2's `fully_shard` leaves one
    (the same class with FSDPModule in front: hooks, no other forward)."""
    kind = type(head)
    return kind is torch.nn.Linear or (FSDPModule is not None and kind.__bases__ == (FSDPModule, torch.nn.Linear))


def _split_refusal(model) -> str | None:
    """Why the head of `model` cannot be applied outside the model, or None when it can."""
    base = base_model(model)
    if base in _UNSPLITTABLE:
        return _UNSPLITTABLE[base]
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not _is_plain_linear(head):
        return f"its output projection is {type(head).__name__}, not a plain Linear layer"
    weight = head.weight
    shape = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3 keeps a partitioned weight's shape there
    if len(shape) != 2 or (weight.numel() == 0 and not hasattr(weight, "ds_id")):
        return ("its output projection's weight is empty outside the forward (flattened into FSDP1's shards; "
                "FSDP2 and ZeRO-3 shards are gathered, FSDP1's are not)")
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


def _fsdp_owner(model, head):
    """The FSDP2 module whose parameter group holds `head`'s parameters: the innermost FSDPModule
    among `head` and the modules that contain it (None when FSDP2 shards none of them)."""
    if FSDPModule is None:
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None:
        return None
    parts = name.split(".") if name else []
    chain = [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return next((m for m in reversed(chain) if isinstance(m, FSDPModule)), None)


@contextlib.contextmanager
def full_parameters(head):
    """While active: `(weight, bias)` of `head` in full on every process, whatever shards them.

    ZeRO-3 (the weight has a `ds_id`): gathered with `deepspeed.zero.GatheredParameters` (not
    modified: `modifier_rank=None`) and partitioned again on exit, unless it was whole already.
    FSDP2 (the weight is a DTensor: its group resharded after the model's forward): the owning
    FSDPModule (found by `head_forward`) unshards, and reshards on exit; a group that kept its
    parameters unsharded after the forward (the root's, accelerate's [norm, head] group) already
    holds the full weight. Autograd records the full parameter, so a gradient computed while it is
    whole accumulates where the engine reduces it (FSDP2's unsharded parameter, ZeRO-3's parameter
    hook; `head_forward` makes the engine's backward hooks run)."""
    weight, bias = head.weight, head.bias
    if hasattr(weight, "ds_id"):
        import deepspeed

        # Only what is partitioned now: leaving the context partitions its parameters, and ZeRO-3
        # keeps small ("persistent") ones whole on every process for good.
        partitioned = [p for p in (weight, bias)
                       if p is not None and p.ds_status is not deepspeed.zero.ZeroParamStatus.AVAILABLE]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
            yield head.weight, head.bias
    elif DTensor is not None and isinstance(weight, DTensor):
        owner = _FSDP_OWNER.get(head)
        if owner is None:
            raise QTuneError("the output projection is sharded by FSDP2 but was not reached through "
                             "qtune.head.head_forward, which finds the module that can gather it")
        owner.unshard()
        try:
            yield head.weight, head.bias
        finally:
            owner.reshard()
    else:
        yield weight, bias


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


class _WithModelOutput(torch.autograd.Function):
    """`hidden` unchanged, and a zero gradient for `output` (the model's own logits), so that the
    backward hooks a sharding engine puts on module outputs run as they would for a loss computed
    from the logits. FSDP2 queues the reduce-scatter of every gradient from such a hook (for a
    model sharded as one unit, none of its other hooks fires). ZeRO-3 gathers the head's
    partitioned weight from the head's hook; the head's backward then adds its zero gradient to
    the same accumulation as the loss's, so autograd accumulates the head's gradient only once the
    weight is whole, and ZeRO-3's parameter hook reduces it. The cost: the head's backward of one
    position (a [V x d] product of zeros) and, where FSDP2 resharded the head, one all-gather."""

    @staticmethod
    def forward(ctx, hidden, output):
        ctx.output_like = (output.shape, output.dtype, output.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.output_like
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def head_forward(model, inputs: dict, keep: torch.Tensor):
    """Run `model(**inputs, logits_to_keep=keep)` and return `(outputs, hidden, head)`:
    the hidden states at the head's input for the True positions of `keep` ([n, d], in
    row-major order), and the head layer (whole or sharded: see `full_parameters`). None when the
    model changes its logits after the head (found on its first call; the caller then takes the
    logits path, and later calls go there).
    """
    base = base_model(model)
    head = base.get_output_embeddings()
    # Found on every call: a model scored before an engine sharded it is the same object after.
    _FSDP_OWNER[head] = _fsdp_owner(model, head)
    captured: dict = {}
    with _capture_head_input(head, captured):
        outputs = model(**inputs, logits_to_keep=keep)
    hidden = captured["hidden"]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if base not in _CHECKED and hidden.shape[0] > 0:
        with torch.no_grad():
            with full_parameters(head) as (weight, bias):
                ours = F.linear(hidden[:1], weight, bias).float()
            theirs = outputs.logits.reshape(-1, outputs.logits.shape[-1])[:1].float()
        tolerance = 1e-4 if ours.dtype == weight.dtype else 1e-2
        if theirs.shape != ours.shape or not torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance):
            _refuse(base, "its logits differ from its output projection (it transforms them after the head)")
            return None
        _CHECKED.add(base)
    sharded = _FSDP_OWNER[head] is not None or hasattr(head.weight, "ds_id")
    if sharded and torch.is_grad_enabled():
        hidden = _WithModelOutput.apply(hidden, outputs.logits)
    return outputs, hidden, head


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T + bias, target_i), gradients computed in the forward.

    For logits z = W h + b and p = softmax(z): dCE/dz = p - onehot(target), so per chunk
    g = w * (p - onehot) gives dh = g W, dW += g^T h and db += sum g. The backward multiplies
    them by the incoming gradient (a scalar). With an `objective` other than NLL the sum is of
    w_i * f(-CE_i), and each token's gradient weight is w_i * (-f') (`qtune.objectives`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, rows, objective):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # In the weight's dtype, as autograd's own gradient: addmm_ adds each chunk's product with
        # float32 accumulation inside the matrix product, and no float32 [V x d] copy is needed.
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                     if needs_bias and bias is not None else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
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
                         token_weight: torch.Tensor | None = None, *, chunk_tokens: int | None = None,
                         impl: str = "chunked", objective: Objective | None = None) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` [n, d] against `target` [n] (each weighted by
    `token_weight` when given), in float32, differentiable in the hidden states and the head's
    parameters, without the [n x V] logits. `impl`: "chunked" (rows per chunk from
    `working_block`; `chunk_tokens` None sizes them to the work) or "liger" (unweighted NLL only).
    `objective`: another token objective than NLL (`qtune.objectives`), chunked only. A sharded
    head is gathered for the computation (`full_parameters`)."""
    if objective is not None and objective.is_nll:
        objective = None
    if impl not in ("chunked", "liger"):
        raise ValueError(f"impl must be 'chunked' or 'liger', not {impl!r}")
    if impl == "liger" and (objective is not None or token_weight is not None):
        raise ValueError("the Liger loss computes unweighted NLL only")
    with full_parameters(head) as (weight, bias):
        if impl == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, target, bias).float()
        rows, _ = working_block(hidden.shape[0], hidden.shape[1], weight.shape[0], chunk_tokens)
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, token_weight, rows, objective)

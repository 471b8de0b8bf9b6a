"""The policies two token objectives compare the trained one with (`qtune.objectives.Objective.reference`),
run as a no-grad forward of the step's kept rows next to the training forward (`qtune.step`):

- `BasePolicy`, ASFT's anchor: the model training started from. With LoRA (a PEFT model) it is the same
  model with its adapters disabled, so no second copy of the weights exists; a fully fine-tuned model
  needs a frozen copy of its starting weights, loaded once from `--model` (as Rho-1's reference model is
  loaded, `qtune.scorer.build_scorer`): a second copy of the weights in memory. Either way it is exact
  after --resume too (the base weights never change).
- `OldPolicy`, PSFT's pi_old: the trainable weights as they were at the start of the current window of
  `window` optimizer steps (PPO's policy before the update of a batch split into `window`
  mini-batches). A copy of the trainable parameters (LoRA: the adapters only; full fine-tuning: every
  weight) is taken at steps 0, window, 2 window, ... before the step's forward, and swapped in for the
  no-grad forward (the parameters' storage exchanged, nothing copied). The first step of a window has
  ratio 1 everywhere (the copy is the current weights): PSFT's update is NLL's there. The copy is not
  saved with checkpoints: a run resumed at a step inside a window starts a new window there (the same
  windows as an uninterrupted run when --save-steps is a multiple of the window).

Each forward runs in eval mode (no dropout) under no_grad, on the module inside any DDP wrapper.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import QTuneError


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode inside the block, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sharded(params) -> bool:
    """Whether any of `params` is a shard (FSDP2's DTensor, ZeRO-3's partitioned parameter)."""
    return any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in params)


class ReferencePolicy:
    """A policy to compare with: `begin_step` before each optimizer step's forwards, `applied(model)`
    a context whose value is the model to run for it (no gradient)."""

    def begin_step(self, model, step: int) -> None:
        """Called with the trained model (not wrapped) before optimizer step `step` (0-based)."""

    def applied(self, model):
        raise NotImplementedError


class BasePolicy(ReferencePolicy):
    """The model training started from: `model` with its adapters disabled, or `frozen`, a copy of its
    starting weights (full fine-tuning)."""

    def __init__(self, frozen: torch.nn.Module | None = None):
        self.frozen = None if frozen is None else frozen.requires_grad_(False).eval()

    def begin_step(self, model, step: int) -> None:
        if sharded(model.parameters()):
            raise QTuneError("--loss asft compares with the base model's token distribution, which is not "
                             "computed from weights sharded by FSDP or ZeRO-3 yet: train without sharding")

    @contextlib.contextmanager
    def applied(self, model):
        if self.frozen is not None:
            yield self.frozen.to(next(model.parameters()).device)
            return
        with evaluating(model), model.disable_adapter():
            yield model


class OldPolicy(ReferencePolicy):
    """The trainable weights at the start of the current window of `window` optimizer steps."""

    def __init__(self, window: int):
        self.window = window
        self.snapshot: list[torch.Tensor] | None = None

    def begin_step(self, model, step: int) -> None:
        if self.snapshot is not None and step % self.window:
            return
        params = trainable_parameters(model)
        if sharded(params):
            raise QTuneError("--loss psft swaps a copy of the trainable weights in for its old policy; weights "
                             "sharded by FSDP or ZeRO-3 cannot be swapped: train without sharding, or with LoRA")
        self.snapshot = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    def applied(self, model):
        if self.snapshot is None:
            raise QTuneError("--loss psft: the old policy was not taken before the step (begin_step)")
        params = trainable_parameters(model)
        current = [p.data for p in params]
        try:
            for p, old in zip(params, self.snapshot, strict=True):
                p.data = old
            with evaluating(model):
                yield model
        finally:
            for p, data in zip(params, current):
                p.data = data


def reference_policy(objective, model, load_base) -> ReferencePolicy | None:
    """The policy `objective` compares with, for the trained `model` (None: none). `load_base()` gives a
    frozen copy of the starting weights, called only for ASFT without adapters to disable."""
    if objective.reference == "old":
        return OldPolicy(objective.window)
    if objective.reference == "base":
        unwrapped = getattr(model, "module", model)
        return BasePolicy(None if hasattr(unwrapped, "disable_adapter") else load_base())
    return None

"""`QTuneTrainer`: a `transformers.Trainer` whose steps train only what a pruning method keeps, a
thin front end of `qtune.step` (`qtune train`, `qtune.train`, and `QTuneSFTTrainer` drive it).

One optimizer step, as `QTuneTrainer` runs it:

1. `get_batch_samples` takes this process's micro-batches of the step from the data loader and
   hands them to `qtune.step`: scoring pass if the method needs it, gathering over processes
   (`triage_scope`), the method's decision, this process's kept rows packed (`plan_step`); it
   returns the packed micro-batches and the step's kept-token count over every process;
2. the Trainer's own loop runs forward and backward on each packed micro-batch (`training_step`,
   `compute_loss` = `qtune.step.micro_batch_loss`), with its accumulation, mixed precision and
   engine (DDP, FSDP2, DeepSpeed ZeRO-2/3: `qtune.engine`, checked when the Trainer is built).
   No micro-batch is empty, so no process skips a backward.

Once the gradients are in, the step's loss (summed over processes) and gradient norm are read
together (the step's one host sync); a non-finite value stops the run before the optimizer moves
(`nonfinite="stop"`) or drops the step's gradients (`"skip"`). Non-finite scores count the same.
DeepSpeed steps inside the last backward, before the norm is read: it skips a step whose
gradients are not finite itself (its overflow path, which also drops the reduced gradient
partitions), and a step skipped for its scores is given gradients it skips (`_skip_under_deepspeed`).

A method that decides once before training (`Method.pass_needs`, e.g. Token Cleaning) gets its
pass when training begins, once the engine wraps the model and before the first step: each
process scores its share of the training set with the initial weights (as many forward passes on
every process), the values are gathered, every process fixes the same label masks and the main
process saves them (`TOKEN_MASKS`); --resume reads them back. A reference model (Rho-1, Token
Cleaning) is made ready for the engine at the same point (`qtune.engine.frozen_for_engine`).

Everything else (optimizer, schedule, checkpoints, resume, logging integrations) is the Trainer's;
checkpoints are written through `qtune.checkpoints`, so that each one is complete or absent, and
hold the method's state (`METHOD_STATE`). Only the main process writes files: step log, run
config, token masks, checkpoints' own files, summary and model (which every process gathers:
`qtune.engine.save_trained_model`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from . import checkpoints
from .checkpoints import StagedCheckpoints
from .console import log
from .data import length_bucketed_batches
from .engine import SHARDED, check_engine, frozen_for_engine, local_shards, save_trained_model
from .errors import QTuneError
from .io import atomic_path, write_json
from .methods import Method, TokenMasks
from .objectives import Objective
from .phases import PhaseClock
from .reference_policy import ReferencePolicy
from .run_log import STEP_LOG
from .scorer import DriftMeter, Scorer
from .step import (concatenates_kept_rows, gather, loss_token_count, micro_batch_loss, placeholder_row, plan_step,
                   reduce_sum, world)


#: The method's state in a checkpoint: {"states": [one state_dict per process]}.
METHOD_STATE = "qtune-method-state.json"

#: The label masks a method fixed before the first step (`Method.pass_needs`), in the run's folder:
#: safetensors `sample_id`, `offsets`, `keep` (`qtune.methods.TokenMasks`), its `info` as metadata.
TOKEN_MASKS = "qtune-token-masks.safetensors"


class SampleDataset(torch.utils.data.Dataset):
    """Tokenized samples (dicts from `qtune.data.tokenize_records`)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def divergence_message(step: int, what: str, lr: float, bf16: bool, last_checkpoint: Path | None) -> str:
    """The one-line error of a run stopped at a non-finite step: where, what, what was kept, and
    what to try."""
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
    precision = " or train in float32 (--dtype float32)," if bf16 else ""
    return (f"training diverged at step {step} ({what}); stopped before updating the weights, no model saved, "
            f"{kept}. Start again with a lower --lr (now {lr:g}),{precision} or pass --nonfinite skip to skip "
            "such steps")


#: The key of a micro-batch that `QTuneTrainer.training_step` skips (no forward, no backward).
SKIP = "qtune_skip"


class QTuneTrainer(StagedCheckpoints, Trainer):
    """A `transformers.Trainer` whose steps train only what a pruning `Method` keeps."""

    def __init__(self, *args, method: Method, pad_token_id: int, triage_scope: str = "global",
                 chunk_tokens: int | None = None, head_impl: str = "auto", kept_row_layout: str = "auto",
                 scorer: Scorer | None = None, pass_scorer: Callable[[torch.device], Scorer] | None = None,
                 objective: Objective | None = None, reference: ReferencePolicy | None = None,
                 step_log: str | Path | None = None, nonfinite: str = "stop",
                 keep_checkpoints: int | None = None, log_token_masks: bool = False, progress: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.progress = progress  # the progress bar of the pass over the training set (main process)
        self.log_token_masks = log_token_masks
        # Builds the scorer of the method's pass over the training set on a device, when it has one
        # (`qtune.scorer.build_scorer(training_set_pass=True)`): called only when the pass runs.
        self.pass_scorer = pass_scorer
        self.pass_seconds: float | None = None  # of that pass (also read back on --resume)
        self.pad_token_id = pad_token_id
        self.triage_scope = triage_scope
        self.chunk_tokens = chunk_tokens
        self.head_impl = head_impl
        self.kept_row_layout = kept_row_layout
        self.scorer = scorer or Scorer(chunk_tokens=chunk_tokens, head_impl=head_impl)
        self.objective = objective
        self.reference = reference  # the policy the objective compares with (qtune.reference_policy)
        self.step_log = Path(step_log) if step_log else Path(self.args.output_dir) / STEP_LOG
        self.nonfinite = nonfinite
        self.keep_checkpoints = keep_checkpoints
        self.step_record: dict = {}
        self.clock = PhaseClock()  # a step's own, on its device, from get_batch_samples on
        self._step_loss = torch.zeros(())
        self._since_log: list[dict] = []
        self._resumed = False  # whether the current train() resumes (its token masks are read back)
        # compute_loss divides by the step's kept-token count: already scaled for accumulation.
        self.loss_is_scaled_for_ga = True
        self.engine = check_engine(self.args, self.accelerator)  # `qtune.engine`: the one asked for
        self.add_callback(_BeforeFirstStep(self))
        self.add_callback(_StepRecorder(self))
        self.add_callback(_DriftRecorder(self))

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped order over the global batch of a step (micro-batch x accumulation x
        processes), seeded as the Trainer seeds it: the order of the samples then depends only on
        the global batch, so N processes with G micro-batches each see the same steps as one
        process with N x G micro-batches."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        size = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(size, dataset=dataset, model_input_name="input_ids")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.state.global_step >= self.state.max_steps:
            # A run resumed from its last step: the Trainer checks max_steps only after a step, so
            # it would train one more.
            self.control.should_training_stop = True
            return [], None
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        start = time.perf_counter()
        batches = [self._prepare_inputs(b) for b in batches]
        step = self.state.global_step
        scores = None
        reused = self.scorer.reused
        self.clock = PhaseClock(batches[0]["input_ids"].device)
        if self.reference is not None:
            self.reference.begin_step(self.model, step)
        if self.method.needs_scores_at(step, self.state.max_steps):
            with self.clock.phase("score"):
                scores = self.scorer(self.model, batches, self.method.entropy_over)
        plan = plan_step(batches, scores, self.method, step, pad_token_id=self.pad_token_id,
                         triage_scope=self.triage_scope, clock=self.clock,
                         concatenate=concatenates_kept_rows(self.model, self.kept_row_layout),
                         log_token_masks=self.log_token_masks)
        micro_batches = plan.micro_batches
        if plan.nonfinite:
            self._nonfinite_step(plan.nonfinite)
            if self.is_deepspeed_enabled:
                micro_batches = [_skip_under_deepspeed(mb) for mb in micro_batches]
        self.step_record = {
            **plan.record,
            "scoring_seconds": time.perf_counter() - start,
            "skipped": plan.nonfinite is not None,
            "_selected_at": time.perf_counter(),
        }
        if self.scorer.rescore_drift:
            self.step_record["reused_scores"] = self.scorer.reused - reused
            self.step_record["weights_path"] = self.scorer.path / self.scorer.weight_norm if self.scorer.path else 0.0
        self._step_loss = torch.zeros((), device=self.args.device)
        # The Trainer counts micro-batches to find the step's end: the kept rows' micro-batches come
        # last (the last one synchronises gradients), after markers that training_step skips.
        # DeepSpeed counts its backward passes itself: it gets rows of weight 0 instead.
        empty = torch.zeros((1, 0), dtype=torch.long, device=device)  # counts no token, no FLOP
        filler = (placeholder_row(batches[0]) if self.is_deepspeed_enabled
                  else {SKIP: True, "input_ids": empty, "attention_mask": empty}
                  for _ in range(len(batches) - len(plan.micro_batches)))
        return [*filler, *micro_batches], torch.tensor(plan.loss_tokens, device=device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs.get(SKIP):  # a micro-batch the kept rows did not need (get_batch_samples)
            return torch.zeros((), device=self.args.device)
        with self.clock.phase("forward_backward"):  # compute_loss times the forward inside it
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss += loss  # stays on the device until the step's one sync in _get_grad_norm
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's gradient norm, computed after the backward passes and before the optimizer
        step: the one place where the step's loss and norm are read (one host sync per step), and
        where a non-finite step is stopped, or skipped by dropping its gradients (AdamW leaves a
        parameter without a gradient untouched, its moments included)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=self._step_loss.device)
        # Each process's loss is scaled by the world size (the gradient reduction averages).
        step_loss = reduce_sum(self._step_loss.float()) / self.args.world_size
        loss, norm = torch.stack([step_loss, norm]).tolist()
        self.step_record.update(loss=loss, grad_norm=norm)
        if not (math.isfinite(loss) and math.isfinite(norm)) and not self.step_record.get("skipped"):
            self._nonfinite_step(f"loss {loss:.4g}, gradient norm {norm:.4g}")
            self.step_record["skipped"] = True
        if self.step_record.get("skipped"):
            if not self.is_deepspeed_enabled:
                model.zero_grad(set_to_none=True)
            elif model.was_step_applied():  # DeepSpeed has stepped already: it must have skipped
                raise QTuneError(f"DeepSpeed applied step {self.state.global_step + 1}, which qtune skips "
                                 f"({'its scores' if math.isfinite(loss) else 'non-finite loss'})")
        return grad_norm

    def _nonfinite_step(self, what: str) -> None:
        """Stop the run at a non-finite step (nonfinite="stop"), or report that it is skipped.
        Every process reaches the same verdict: the loss, norm and scores are global."""
        step = self.state.global_step + 1
        if self.nonfinite == "stop":
            complete, _ = checkpoints.scan(Path(self.args.output_dir))
            raise QTuneError(divergence_message(step, what, self.args.learning_rate, self.args.bf16,
                                                complete[-1] if complete else None))
        if self.args.should_save:
            log(f"step {step} skipped: {what} (--nonfinite skip)")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A user's `trainer.save_model()` (a TRL script's): the full model, gathered under any
        engine and checked (`qtune.engine.save_trained_model`), written to `output_dir` (default:
        `model/` in the run folder), which it replaces. Every process must call it. The Trainer's own
        calls (checkpoints) keep the Trainer's save."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        run = Path(self.args.output_dir)
        folder = Path(output_dir) if output_dir else run / "model"
        if folder.resolve() == run.resolve():
            raise QTuneError(f"save_model({str(folder)!r}) would replace the run folder, checkpoints included: save "
                             "into another folder (default: its model/)")
        save_trained_model(self.accelerator, self.model_wrapped, self.processing_class, folder)

    def _checkpoint_extra(self):
        """The method's state of every process, in each checkpoint (METHOD_STATE)."""
        states = gather(self.method.state_dict())
        return lambda folder: write_json(folder / METHOD_STATE, {"states": states})

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """The Trainer's `train`, resuming the pruning state too, so that every front end (`qtune
        train`, TRL's `QTuneSFTTrainer`, a user's script) resumes alike: the method's state comes
        back from the checkpoint and the step log is cut back to the checkpoint's step (those steps
        are about to be trained again); a fresh run starts a new step log. `True` means the newest
        complete checkpoint of `output_dir`."""
        resume_from_checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        if resume_from_checkpoint:
            self.load_method_state(Path(resume_from_checkpoint))
        self._resumed = bool(resume_from_checkpoint)
        self._restart_step_log(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _before_first_step(self) -> None:
        """Once the engine wraps the model (`_BeforeFirstStep`): the scorer's reference model made
        ready for the engine, forward passes kept in step under sharding, and the one-time pass of a
        method that decides before training."""
        if self.scorer.reference is not None:
            self.scorer.reference = frozen_for_engine(self.scorer.reference, self.accelerator)
        self.scorer.lockstep = self.engine in SHARDED
        if self.method.pass_needs:
            self._fix_token_masks(resumed=self._resumed)

    def _fix_token_masks(self, resumed: bool) -> None:
        """The one-time pass of a method that decides before training (`Method.pass_needs`): on a
        new run, every process scores its share of the training set with the initial weights,
        the values are gathered, every process fixes the same masks (`Method.fix_masks`) and the
        main process saves them (OUT/TOKEN_MASKS); on --resume every process reads them back."""
        path = Path(self.args.output_dir) / TOKEN_MASKS
        if resumed:
            masks = read_token_masks(path)
        else:
            start = time.perf_counter()
            values = {}
            for share in gather(self._pass_values()):
                values.update(share)
            masks = self.method.fix_masks(values)
            del values
            masks.info["seconds"] = repr(time.perf_counter() - start)
            if self.args.should_save:
                write_token_masks(path, masks)
        self.pass_seconds = float(masks.info["seconds"])
        if self.args.should_save:
            details = ", ".join(f"{k} {v}" for k, v in masks.info.items() if k != "seconds")
            log(f"{self.method.name}: token masks fixed before the first step by a pass over the training set of "
                f"{self.pass_seconds:.1f} s ({details}){'; read back from' if resumed else '; saved to'} {path}")
        self.method.use_masks(masks)

    def _pass_values(self) -> dict[int, torch.Tensor]:
        """`Method.pass_values` of this process's share of the training set (every world-size-th
        sample, from its rank on), scored with the model as it is before the first step, in
        micro-batches of the training size grouped by length (little padding)."""
        import datasets
        from tqdm.auto import tqdm

        if self.pass_scorer is None:
            raise QTuneError(f"method {self.method.name!r} decides from a pass over the training set before "
                             "training; give QTuneTrainer pass_scorer= (see qtune.scorer.build_scorer)")
        device = next(self.model.parameters()).device
        scorer = self.pass_scorer(device)
        if scorer.reference is not None:
            scorer.reference = frozen_for_engine(scorer.reference, self.accelerator)
        dataset = self.train_dataset
        if isinstance(dataset, datasets.Dataset):  # the columns the collator takes, as the training loader keeps them
            dataset = self._remove_unused_columns(dataset, description="the pass over the training set")
        rank, size = world()
        share = range(rank, len(dataset), size)
        groups = [[share[j] for j in group] for group in
                  length_bucketed_batches([len(dataset[i]["input_ids"]) for i in share],
                                          self.args.per_device_train_batch_size)]
        # Under FSDP2 and ZeRO-3 each forward gathers weights from every process: a process with
        # fewer batches runs the others' extra forwards on its first sample, its values unused.
        extra = max(gather(len(groups))) - len(groups) if self.engine in SHARDED else 0
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=groups + [[0]] * extra,
                                             collate_fn=self.data_collator)
        values = {}
        for i, batch in enumerate(tqdm(loader, desc=f"{self.method.name}: pass over the training set", unit="batch",
                                       disable=not (self.progress and self.is_world_process_zero()))):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            scores = scorer(self.model, [batch])[0]
            if i < len(groups):
                values.update(self.method.pass_values(batch, scores))
        return values

    def load_method_state(self, checkpoint: Path) -> None:
        """Restore this process's method state from `checkpoint`. Nothing to restore for a
        method without state (or a checkpoint without the file), whatever the number of processes."""
        path = Path(checkpoint) / METHOD_STATE
        states = json.loads(path.read_text(encoding="utf-8"))["states"] if path.exists() else []
        if any(states):
            if len(states) != self.args.world_size:
                raise QTuneError(f"--resume: {checkpoint} was saved by {len(states)} process(es); resume it with "
                                 f"as many, not {self.args.world_size}")
            self.method.load_state_dict(states[self.args.process_index])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """This process's share of the mean loss over the step's kept tokens (`qtune.step`);
        without `num_items_in_batch`, the mean over this micro-batch's kept tokens."""
        if num_items_in_batch is None:
            num_items_in_batch = max(loss_token_count([inputs]), 1)
        with self.clock.phase("forward") if model.training else contextlib.nullcontext():
            return micro_batch_loss(model, inputs, num_items_in_batch, world()[1],
                                    unwrapped=self.accelerator.unwrap_model(model), return_outputs=return_outputs,
                                    head_impl=self.head_impl, chunk_tokens=self.chunk_tokens, objective=self.objective,
                                    reference=self.reference)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Add the pruning statistics since the last log to the Trainer's logs (tensorboard, ...)."""
        if "loss" in logs and self._since_log:
            recs = self._since_log
            logs["kept_sample_frac"] = sum(r["kept"] for r in recs) / max(sum(r["samples"] for r in recs), 1)
            logs["kept_token_frac"] = sum(r["kept_tokens"] for r in recs) / max(
                sum(r["response_tokens"] for r in recs), 1)
            logs["scoring_seconds"] = sum(r["scoring_seconds"] for r in recs)
            logs["training_seconds"] = sum(r["training_seconds"] for r in recs)
            self._since_log = []
        super().log(logs, start_time)


def _phases(clock: PhaseClock, training_seconds: float) -> dict:
    """A step's phases (`qtune.phases`): seconds of score, select (of which triage and
    token_select), pack, forward, backward and optimizer (the rest of the training time: clipping,
    the optimizer step, the Trainer's own work); on CUDA, the peak MiB of each (backward: of the
    forward and backward together)."""
    taken = clock.take()
    seconds = taken["phase_seconds"]
    both = seconds.pop("forward_backward", 0.0)
    seconds["backward"] = max(both - seconds.get("forward", 0.0), 0.0)
    seconds["optimizer"] = max(training_seconds - both, 0.0)
    if "phase_peak_mib" in taken:
        taken["phase_peak_mib"]["backward"] = taken["phase_peak_mib"].pop("forward_backward", 0.0)
    return taken


class _StepRecorder(TrainerCallback):
    """Completes the step record after the optimizer step and appends it to the step log."""

    def __init__(self, trainer: QTuneTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        record = self.trainer.step_record
        if not record:
            return
        now = time.perf_counter()
        record["training_seconds"] = now - record.pop("_selected_at")
        record.update(_phases(self.trainer.clock, record["training_seconds"]))
        seconds = record["training_seconds"] + record["scoring_seconds"]
        record["tokens_per_second"] = record["input_tokens"] / seconds if seconds > 0 else 0.0
        record["kept_token_fraction"] = record["kept_tokens"] / max(record["response_tokens"], 1)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **record}
        if state.is_world_process_zero:
            with open(self.trainer.step_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.trainer._since_log.append(record)
        self.trainer.step_record = {}


class _BeforeFirstStep(TrainerCallback):
    """Runs `QTuneTrainer._before_first_step` when training begins: the engine wraps the model by then."""

    def __init__(self, trainer: QTuneTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._before_first_step()


class _DriftRecorder(TrainerCallback):
    """Tells the scorer how far each optimizer step moved the weights, when it reuses scores
    (`rescore_drift`)."""

    def __init__(self, trainer: QTuneTrainer):
        # FSDP2 and ZeRO-3 hold a shard of the weights on each process: the norms are summed over processes.
        sharded = trainer.engine in SHARDED
        self.meter = DriftMeter(reduce_sum if sharded else lambda t: t, local_shards if sharded else list)
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.scorer.rescore_drift:
            self.meter.before(self.trainer.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.scorer.rescore_drift:
            self.trainer.scorer.moved(*self.meter.after(self.trainer.model))


class _PruningProgress(ProgressCallback):
    """The Trainer's progress bar, with the step's loss, kept samples and kept tokens."""

    def __init__(self, trainer: QTuneTrainer):
        super().__init__()
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        recs = self.trainer._since_log
        if self.training_bar is not None and recs:
            r = recs[-1]
            self.training_bar.set_postfix(loss=f"{r['loss']:.3f}", kept=f"{r['kept']}/{r['samples']}",
                                          tokens=f"{100 * r['kept_token_fraction']:.0f}%", refresh=False)
        super().on_step_end(args, state, control, **kwargs)


def write_token_masks(path: Path, masks: TokenMasks) -> None:
    """Save `masks` as safetensors (their `info` as the file's metadata), atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"sample_id": masks.sample_id, "offsets": masks.offsets, "keep": masks.keep}, str(tmp),
                  metadata=masks.info)


def read_token_masks(path: Path) -> TokenMasks:
    """The masks `write_token_masks` saved; QTuneError when the file is missing."""
    from safetensors import safe_open

    if not path.is_file():
        raise QTuneError(f"--resume: {path} is missing: it holds the token masks this run fixed before its first step "
                         "(from the initial weights), which a resume reads instead of recomputing; start a new run in "
                         "another --out")
    with safe_open(str(path), framework="pt") as f:
        return TokenMasks(f.get_tensor("sample_id"), f.get_tensor("offsets"), f.get_tensor("keep"), f.metadata())


def _skip_under_deepspeed(micro_batch: dict) -> dict:
    """A micro-batch of a step skipped for its scores, as DeepSpeed gets it: its rows weigh NaN
    instead of 0, so that the step's gradients are not finite and DeepSpeed skips the step itself
    (its overflow path: no update, no optimizer state change, the reduced gradient partitions
    dropped). DeepSpeed steps inside the last backward, before qtune could drop the gradients."""
    return {**micro_batch, "loss_weight": torch.full_like(micro_batch["loss_weight"], math.nan)}

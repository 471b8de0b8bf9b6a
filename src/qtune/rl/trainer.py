"""`QTuneGRPOTrainer`: TRL's `GRPOTrainer` with qtune's run folder and reporting.

The GRPO step (generation, rewards, group-relative advantages, clipped loss, KL, vLLM, several
processes) is TRL's, unchanged. Added:

- complete checkpoints (`qtune.checkpoints`: staged, sealed, then renamed into place; rotation counts
  complete ones only) and `train(resume_from_checkpoint=True)` = the newest complete one, with the
  step log cut back to it;
- a step log, `OUT/steps.jsonl`: one record per optimizer step with TRL's metrics of that step
  (`reward`, `reward_std`, `rewards/<name>/mean` and `/std` per reward function, `kl` when beta > 0,
  `completions/mean_length`, `frac_reward_zero_std`, `entropy`, `clip_ratio/...`, `loss`, `grad_norm`,
  `learning_rate`) plus `seconds` (the step's wall time: generation, rewards, forward, backward,
  optimizer), `zero_variance_groups` and `completion_tokens`; the same metrics reach `report_to`;
- held-out accuracy every `eval_steps` steps and after the last one (`heldout_exact_match`, greedy,
  `qtune eval`'s strict extractor), in the step's record and its log;
- a progress bar with the reward's mean and spread (`RewardProgress`);
- SFT inside RL (`qtune.rl.sft_mix`, docs/rl.md "SFT inside RL"): with `sft_mix.weight` > 0, CHORD's
  loss (1 - mu) GRPO + mu SFT on a micro-batch of expert demonstrations (`compute_loss`; the step
  log gets `sft_loss` and `sft_weight`); with `sft_mix.interleave`, ReLIFT's buffer of the prompts
  whose every completion was wrong, gathered over the processes, and an extra optimizer step on
  their reference answers whenever it fills (`interleaved_sft_step`; the step log gets
  `all_wrong_groups`, `all_wrong_ids`, `sft_buffer` and, on the steps that take it,
  `interleaved_sft_loss`, `interleaved_sft_records`, `interleaved_sft_ids`); the buffer is kept in
  every checkpoint (`SFT_BUFFER`) for a resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import GRPOTrainer

from ..checkpoints import StagedCheckpoints
from ..data import IGNORE_INDEX, collate
from ..engine import check_engine, whole_model_work
from ..errors import QTuneError
from ..evaluate import evaluate_exact_match
from ..io import write_json
from .sft_mix import (
    SFTMix, all_wrong_groups, chord_loss, expert_positions, expert_token_nll, process_share, weighted_nll_sum,
)

STEP_LOG = "steps.jsonl"
HELDOUT = "heldout_exact_match"
#: The interleaved-SFT buffer (sample ids waiting for an SFT step), in each checkpoint.
SFT_BUFFER = "qtune-sft-buffer.json"


class QTuneGRPOTrainer(StagedCheckpoints, GRPOTrainer):
    """`trl.GRPOTrainer` with complete checkpoints, a step log, held-out accuracy and qtune's resume.

    Extra arguments: `heldout` (records of held-out problems, or None), `eval_config` (a
    `qtune.config.EvalConfig` for them), `eval_steps` (every N steps; 0: after the last step only),
    `step_log` (default `output_dir/steps.jsonl`), `keep_checkpoints` (complete checkpoints kept;
    pass `save_total_limit=None` in the GRPOConfig: the rotation is this class's), `sft_mix` (a
    `qtune.rl.sft_mix.SFTMix`: the SFT terms, none by default) and `demonstrations` (the expert
    demonstrations they train on, tokenized samples by sample_id: `qtune.rl.prompts.demonstrations`)."""

    def __init__(self, *args, heldout=None, eval_config=None, eval_steps: int = 0, step_log=None,
                 keep_checkpoints: int | None = None, sft_mix: SFTMix | None = None,
                 demonstrations: dict[int, dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = check_engine(self.args, self.accelerator)  # `qtune.engine`: the one asked for
        self.sft_mix = sft_mix or SFTMix()
        self.demonstrations = demonstrations or {}
        self.demonstration_ids = sorted(self.demonstrations)
        if self.sft_mix.active and not self.demonstrations:
            raise QTuneError("SFT inside RL (sft_weight, interleave_sft) needs expert demonstrations: records whose "
                             "reference answer fits in sft_max_length tokens after its prompt; none was given")
        if self.sft_mix.interleave and self.engine not in ("single", "ddp"):
            raise QTuneError(f"interleave_sft takes its optimizer step outside the Trainer's, which {self.engine} "
                             "does not allow here: train in one process or under DDP")
        self.sft_buffer: list[int] = []  # sample ids of all-wrong prompts, the same on every process
        self.step_extra: dict = {}  # the current step's fields for the step log only (ids, counts)
        if heldout and self.engine == "fsdp2":
            # Each process generates for its own share, out of step with the others: FSDP2's shards
            # cannot be gathered for that (ZeRO-3's are, in heldout_accuracy).
            raise QTuneError("held-out evaluation during RL generates on each process's own model, which FSDP2 "
                             "shards: leave eval_data unset (eval_steps 0) and evaluate OUT/model with qtune eval, "
                             "or train with DDP or DeepSpeed")
        self.heldout = list(heldout) if heldout else None
        self.eval_config = eval_config
        self.eval_steps = eval_steps
        self.step_log = Path(step_log) if step_log else Path(self.args.output_dir) / STEP_LOG
        self.keep_checkpoints = keep_checkpoints
        self.add_callback(_StepRecorder(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """TRL's `train`; `True` resumes from the newest complete checkpoint of `output_dir`. Resuming
        cuts the step log back to the checkpoint's step; a fresh run starts a new step log."""
        resume_from_checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        self._restart_step_log(resume_from_checkpoint)
        if resume_from_checkpoint and self.sft_mix.interleave:
            self.sft_buffer = json.loads((Path(resume_from_checkpoint) / SFT_BUFFER).read_text())["buffer"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _checkpoint_extra(self):
        """With interleave_sft, the buffer (the same on every process) in each checkpoint."""
        if not self.sft_mix.interleave:
            return None
        buffer = list(self.sft_buffer)
        return lambda folder: write_json(folder / SFT_BUFFER, {"buffer": buffer})

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.state.global_step >= self.state.max_steps:
            # Resumed from the last step's checkpoint: transformers checks max_steps only after a step.
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's GRPO loss of the micro-batch; with sft_weight, CHORD's (1 - mu) GRPO + mu SFT, the
        SFT loss being the (token-weighted) mean NLL of an expert micro-batch (`expert_batch`),
        divided, as TRL's loss is, by the micro-batches of the step. mu is that of the step
        (`SFTMix.weight_at`); at mu = 0 no expert forward runs."""
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.sft_mix.weight == 0 or not self.model.training:
            return loss
        mu = self.sft_mix.weight_at(self.state.global_step, self.state.max_steps)
        self._metrics["train"]["sft_weight"].append(mu)
        if mu == 0:
            return loss
        batch = self.expert_batch()
        nll = expert_token_nll(self._logits(model, batch), batch["labels"])
        sft = weighted_nll_sum(nll, self.sft_mix.token_weight) / nll.numel()
        self._metrics["train"]["sft_loss"].append(self.accelerator.gather(sft.detach()).mean().item())
        return chord_loss(loss, sft / self.current_gradient_accumulation_steps, mu)

    def expert_batch(self) -> dict:
        """The current micro-batch's expert demonstrations (CHORD), on the device: one per prompt of
        the micro-batch (batch_size / num_generations, at least one), draw number
        micro-batch x processes + rank of `expert_positions`, so each process draws its own and a
        resumed run draws what the first one drew."""
        size = max(1, self.args.per_device_train_batch_size // self.num_generations)
        accum = self.args.gradient_accumulation_steps
        micro_batch = self.state.global_step * accum + self._step % accum  # TRL's _step: micro-batches so far
        draw = micro_batch * self.accelerator.num_processes + self.accelerator.process_index
        positions = expert_positions(len(self.demonstration_ids), size, draw, self.args.seed)
        return self._collate([self.demonstration_ids[p] for p in positions])

    def _collate(self, sample_ids: list[int]) -> dict:
        batch = collate([self.demonstrations[s] for s in sample_ids], self.processing_class.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _logits(self, model, batch: dict) -> torch.Tensor:
        """The model's logits on an expert batch, at temperature 1: the model's own forward, not
        TRL's fused head, which scores at the sampling temperature."""
        with self.accelerator.autocast():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards of the step's completions, gathered over the processes; with
        interleave_sft, the all-wrong groups among them are collected into the buffer."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.sft_mix.interleave and self.model.training:
            # The rewards are every process's, in rank order; so are the gathered sample ids.
            self.collect_all_wrong(rewards, gather_object([x["sample_id"] for x in inputs]))
        return rewards

    def collect_all_wrong(self, rewards: torch.Tensor, sample_ids: list[int]) -> None:
        """Adds to the buffer the sample ids of the groups whose every completion is wrong
        (`all_wrong_groups` on the correctness reward's column of `rewards` [completions,
        functions]; `sample_ids` one per completion, a group's G in a row), except those already
        waiting in it and those without a demonstration."""
        group_size = self.num_generations
        correctness = rewards[:, self.sft_mix.correctness].float().cpu().view(-1, group_size)
        collected = all_wrong_groups(correctness, sample_ids[::group_size])
        waiting = set(self.sft_buffer)
        for s in collected:
            if s in self.demonstrations and s not in waiting:
                self.sft_buffer.append(s)
                waiting.add(s)
        self.step_extra.setdefault("all_wrong_ids", []).extend(collected)

    def after_optimizer_step(self) -> None:
        """At the end of every optimizer step, on every process (`_StepRecorder`): with
        interleave_sft, the SFT step on the buffer once it holds interleave_batch records, which
        empties it; the step log gets what was collected and trained."""
        if not self.sft_mix.interleave:
            return
        self.step_extra["all_wrong_groups"] = len(self.step_extra.setdefault("all_wrong_ids", []))
        if len(self.sft_buffer) >= self.sft_mix.interleave_batch:
            trained, self.sft_buffer = self.sft_buffer, []
            self._metrics["train"]["interleaved_sft_loss"].append(self.interleaved_sft_step(trained))
            self.step_extra.update(interleaved_sft_records=len(trained), interleaved_sft_ids=trained)
        self.step_extra["sft_buffer"] = len(self.sft_buffer)

    def interleaved_sft_step(self, sample_ids: list[int]) -> float:
        """ReLIFT's fine-tuning step: one optimizer step on the mean NLL of the demonstrations'
        tokens, the same on every process. Each process takes its share of `sample_ids` in
        micro-batches of batch_size (`process_share`) and scales its summed NLL by processes / all
        tokens, so that DDP's mean of the processes' gradients is the gradient of
        (NLL summed over every token of `sample_ids`) / (their tokens); a process whose share has run
        out backs up a micro-batch with weight 0, so that every gradient reduction has every
        process. Then clipping to max_grad_norm and the run's optimizer at its current learning
        rate (the schedule does not advance). Returns that mean NLL, before the step."""
        model = self.model_wrapped
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        tokens = sum(sum(label != IGNORE_INDEX for label in self.demonstrations[s]["labels"][1:])
                     for s in sample_ids)
        total = torch.zeros((), device=self.accelerator.device)
        for chunk in process_share(sample_ids, world, rank, self.args.per_device_train_batch_size):
            batch = self._collate(chunk or sample_ids[:1])
            nll_sum = expert_token_nll(self._logits(model, batch), batch["labels"]).sum()
            self.accelerator.backward(nll_sum * (world / tokens if chunk else 0.0))
            if chunk:
                total += nll_sum.detach()
        if self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.model.zero_grad()
        return self.accelerator.reduce(total, reduction="sum").item() / tokens

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log (it adds the step's metrics); a training step's log first gets the held-out
        accuracy when one is due."""
        if "loss" in logs and self.heldout and self._heldout_due():
            logs[HELDOUT] = self.heldout_accuracy()
        super().log(logs, start_time)

    def _heldout_due(self) -> bool:
        step = self.state.global_step
        return step >= self.state.max_steps or (self.eval_steps > 0 and step % self.eval_steps == 0)

    def heldout_accuracy(self) -> float:
        """Greedy exact match on the held-out records with the current weights. Each process
        generates for its share of the records (every num_processes-th one) and the verdicts are
        gathered, so every process returns the same number. Under ZeRO-3 the weights are gathered
        whole on every process meanwhile (TRL's `unwrap_model_for_generation`), since the processes
        generate out of step (`qtune.engine.whole_model_work`)."""
        from trl.models.utils import unwrap_model_for_generation

        share = self.heldout[self.args.process_index::self.args.world_size]
        verdicts = []
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model, whole_model_work():
            if share:
                _, predictions = evaluate_exact_match(model, self.processing_class, share, self.eval_config,
                                                      progress=False)
                verdicts = [p["correct_strict"] for p in predictions]
        verdicts = gather_object(verdicts) if self.args.world_size > 1 else verdicts
        return sum(verdicts) / len(verdicts)


class _StepRecorder(TrainerCallback):
    """Times every optimizer step and appends its record to the step log (main process)."""

    def __init__(self, trainer: QTuneGRPOTrainer):
        self.trainer = trainer
        self.started = self.seconds = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.after_optimizer_step()  # an interleaved SFT step counts in the step's time
        self.seconds = time.perf_counter() - self.started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}):
            return
        extra, self.trainer.step_extra = self.trainer.step_extra, {}
        if not state.is_world_process_zero:
            return
        with open(self.trainer.step_log, "a", encoding="utf-8") as f:
            f.write(json.dumps({**step_record(state.global_step, self.seconds, logs, args), **extra}) + "\n")


def step_record(step: int, seconds: float, logs: dict, args) -> dict:
    """A step's record: its number, wall seconds and logged metrics, plus the zero-variance groups
    (TRL logs their share, `frac_reward_zero_std`) and the completion tokens of the step's
    generation (`completions/mean_length` x the completions generated), when the step generated."""
    record = {"step": step, "seconds": seconds, **logs}
    completions = args.generation_batch_size
    if "frac_reward_zero_std" in logs:
        record["zero_variance_groups"] = round(logs["frac_reward_zero_std"] * completions / args.num_generations)
    if "completions/mean_length" in logs:
        record["completion_tokens"] = round(logs["completions/mean_length"] * completions)
    return record


class RewardProgress(ProgressCallback):
    """The Trainer's progress bar, with the step's reward mean and spread (and the last held-out
    accuracy) instead of a printed log line per step."""

    def __init__(self):
        super().__init__()
        self.heldout = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or "reward" not in (logs or {}):
            return
        self.heldout = logs.get(HELDOUT, self.heldout)
        shown = {"reward": f"{logs['reward']:.3f}±{logs.get('reward_std', 0.0):.3f}"}
        if self.heldout is not None:
            shown["heldout"] = f"{100 * self.heldout:.1f}%"
        self.training_bar.set_postfix(shown, refresh=False)

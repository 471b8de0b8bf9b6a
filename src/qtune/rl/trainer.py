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
- a progress bar with the reward's mean and spread (`RewardProgress`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import GRPOTrainer

from ..engine import check_engine, whole_model_work
from ..errors import QTuneError
from ..evaluate import evaluate_exact_match
from ..checkpoints import StagedCheckpoints

STEP_LOG = "steps.jsonl"
HELDOUT = "heldout_exact_match"


class QTuneGRPOTrainer(StagedCheckpoints, GRPOTrainer):
    """`trl.GRPOTrainer` with complete checkpoints, a step log, held-out accuracy and qtune's resume.

    Extra arguments: `heldout` (records of held-out problems, or None), `eval_config` (a
    `qtune.config.EvalConfig` for them), `eval_steps` (every N steps; 0: after the last step only),
    `step_log` (default `output_dir/steps.jsonl`), `keep_checkpoints` (complete checkpoints kept;
    pass `save_total_limit=None` in the GRPOConfig: the rotation is this class's)."""

    def __init__(self, *args, heldout=None, eval_config=None, eval_steps: int = 0, step_log=None,
                 keep_checkpoints: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = check_engine(self.args, self.accelerator)  # `qtune.engine`: the one asked for
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
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.state.global_step >= self.state.max_steps:
            # Resumed from the last step's checkpoint: transformers checks max_steps only after a step.
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

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
        self.seconds = time.perf_counter() - self.started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or "loss" not in (logs or {}):
            return
        with open(self.trainer.step_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(step_record(state.global_step, self.seconds, logs, args)) + "\n")


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

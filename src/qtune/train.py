"""SFT with dynamic pruning, on top of `transformers.Trainer`.

One optimizer step, as `QTuneTrainer` runs it:

1. `get_batch_samples` takes the step's micro-batches from the data loader;
2. if the method needs them, a no-grad pass with the current weights scores every sample
   (`qtune.scoring.score_batch`);
3. the method (`qtune.methods`) decides which rows train and which response tokens keep their loss;
4. the kept rows are physically cut out of the batch (`pack_kept`): dropped samples cost no
   forward or backward, and each row is trimmed after its last loss position;
5. the Trainer's own loop runs forward and backward on the packed micro-batches; `compute_loss`
   sums token cross-entropies and divides by the kept-token count of the whole step, so the loss
   is the mean over kept tokens however the step is split into micro-batches.

Once the gradients are in, the step's loss and gradient norm are read together (the step's one
host sync); a non-finite value stops the run before the optimizer moves (`nonfinite="stop"`) or
drops the step's gradients (`"skip"`). Non-finite scores count the same.

Everything else (optimizer, schedule, checkpoints, resume, logging integrations) is the Trainer's;
checkpoints are written through `qtune.checkpoints`, so that each one is complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from . import checkpoints
from .config import TrainConfig
from .data import collate, require_pad_token
from .errors import QTuneError
from .io import claim_output_dir, write_json, write_text
from .methods import PruningMethod, Selection, StepSelection, build_method
from .models import check_vocabulary, load_model, load_tokenizer, resolve_device, resolve_dtype
from .scoring import IGNORE_INDEX, accepts_logits_to_keep, score_batch

STEP_LOG = "steps.jsonl"


class SampleDataset(torch.utils.data.Dataset):
    """Tokenized samples (dicts from `qtune.data.tokenize_records`)."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def _take_row(batch: dict, row: int, label_mask: torch.Tensor) -> dict | None:
    """One row of a right-padded batch with pruned labels, cut after its last loss position
    (later positions cannot influence the loss of a causal model). None if no token is left."""
    labels = batch["labels"][row].masked_fill(~label_mask[row], IGNORE_INDEX)
    positions = (labels != IGNORE_INDEX).nonzero()
    if positions.numel() == 0:
        return None
    end = int(positions[-1]) + 1
    return {
        "input_ids": batch["input_ids"][row, :end],
        "attention_mask": batch["attention_mask"][row, :end],
        "labels": labels[:end],
        "sample_id": batch["sample_id"][row],
    }


def pack_kept(batches: list[dict], selections: list[Selection], pad_token_id: int) -> list[dict]:
    """Cut the kept rows out of the step's micro-batches and spread them evenly over the same
    number of micro-batches (the Trainer's accumulation bookkeeping counts them); a micro-batch
    may be empty when fewer rows than micro-batches are kept."""
    rows = []
    for batch, selection in zip(batches, selections):
        for r in selection.rows.tolist():
            row = _take_row(batch, r, selection.label_mask)
            if row is not None:
                rows.append(row)
    n_parts = len(batches)
    bounds = [round(i * len(rows) / n_parts) for i in range(n_parts + 1)]
    packed = []
    for start, end in zip(bounds, bounds[1:]):
        group = rows[start:end]
        length = max((len(r["input_ids"]) for r in group), default=0)
        device = batches[0]["input_ids"].device

        def stack(key, fill):
            out = torch.full((len(group), length), fill, dtype=torch.long, device=device)
            for i, r in enumerate(group):
                out[i, : len(r[key])] = r[key]
            return out

        packed.append({
            "input_ids": stack("input_ids", pad_token_id),
            "attention_mask": stack("attention_mask", 0),
            "labels": stack("labels", IGNORE_INDEX),
            "sample_id": torch.stack([r["sample_id"] for r in group]) if group else
            torch.zeros(0, dtype=torch.long, device=device),
        })
    return packed


def _count_loss_tokens(batches: list[dict]) -> int:
    return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)


def _nonfinite_scores(scores: list | None) -> str | None:
    """What is wrong with the scoring pass's per-sample PPL and entropy, or None when every value is
    finite. A healthy model cannot produce NaN or inf here: it is the model that has diverged."""
    if scores is None:
        return None
    finite = torch.cat([s.ppl.isfinite() & s.ent.isfinite() for s in scores])
    if bool(finite.all()):
        return None
    return f"the scoring pass gave a non-finite PPL or entropy for {int((~finite).sum())} of {finite.numel()} samples"


def _keep_nothing(batches: list[dict]) -> StepSelection:
    """A step that trains no sample (a skipped step)."""
    selections = [Selection(torch.zeros(0, dtype=torch.long), torch.zeros_like(b["labels"], dtype=torch.bool))
                  for b in batches]
    return StepSelection(selections, {"samples": sum(b["labels"].shape[0] for b in batches), "kept": 0})


def divergence_message(step: int, what: str, lr: float, bf16: bool, last_checkpoint: Path | None) -> str:
    """The one-line error of a run stopped at a non-finite step: where, what, what was kept, and
    what to try."""
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
    precision = " or train in float32 (--dtype float32)," if bf16 else ""
    return (f"training diverged at step {step} ({what}); stopped before updating the weights, no model saved, "
            f"{kept}. Start again with a lower --lr (now {lr:g}),{precision} or pass --nonfinite skip to skip "
            "such steps")


class QTuneTrainer(Trainer):
    """A `transformers.Trainer` whose steps train only what a `PruningMethod` keeps."""

    def __init__(self, *args, method: PruningMethod, pad_token_id: int, entropy_over: str = "response",
                 chunk_tokens: int = 128, step_log: str | Path | None = None, nonfinite: str = "stop",
                 keep_checkpoints: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.pad_token_id = pad_token_id
        self.entropy_over = entropy_over
        self.chunk_tokens = chunk_tokens
        self.step_log = Path(step_log) if step_log else Path(self.args.output_dir) / STEP_LOG
        self.nonfinite = nonfinite
        self.keep_checkpoints = keep_checkpoints
        self.step_record: dict = {}
        self._step_loss = torch.zeros(())
        self._since_log: list[dict] = []
        self._staging: Path | None = None
        # compute_loss divides by the step's kept-token count: already scaled for accumulation.
        self.loss_is_scaled_for_ga = True
        self.add_callback(_StepRecorder(self))

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
        scores = None
        if self.method.needs_scores_at(self.state.global_step, self.state.max_steps):
            model = self.model
            was_training = model.training
            model.eval()
            scores = [score_batch(model, b["input_ids"], b["attention_mask"], b["labels"],
                                  entropy_over=self.entropy_over, chunk_tokens=self.chunk_tokens)
                      for b in batches]
            model.train(was_training)
        bad_scores = _nonfinite_scores(scores)
        if bad_scores:
            self._nonfinite_step(bad_scores)
            decision = _keep_nothing(batches)
        else:
            decision = self.method.select(batches, scores, self.state.global_step)
        packed = pack_kept(batches, decision.selections, self.pad_token_id)
        kept_tokens = _count_loss_tokens(packed)
        response_tokens = _count_loss_tokens(batches)
        self.step_record = {
            **decision.stats,
            "kept": sum(b["input_ids"].shape[0] for b in packed),
            "response_tokens": response_tokens,
            "kept_tokens": kept_tokens,
            "input_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "trained_input_tokens": sum(int(b["attention_mask"].sum()) for b in packed),
            "scoring_seconds": time.perf_counter() - start,
            "sample_ids": torch.cat([b["sample_id"] for b in batches]).tolist(),
            "kept_ids": torch.cat([b["sample_id"] for b in packed]).tolist(),
            "skipped": bad_scores is not None,
            "_selected_at": time.perf_counter(),
        }
        self._step_loss = torch.zeros((), device=self.args.device)
        return packed, torch.tensor(max(kept_tokens, 1), device=device)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if inputs["input_ids"].shape[0] == 0:  # every kept row went to another micro-batch
            return torch.zeros((), device=self.args.device)
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
        loss, norm = torch.stack([self._step_loss.float(), norm]).tolist()
        self.step_record.update(loss=loss, grad_norm=norm)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._nonfinite_step(f"loss {loss:.4g}, gradient norm {norm:.4g}")
            model.zero_grad(set_to_none=True)
            self.step_record["skipped"] = True
        return grad_norm

    def _nonfinite_step(self, what: str) -> None:
        """Stop the run at a non-finite step (nonfinite="stop"), or report that it is skipped."""
        from .workflows import log

        step = self.state.global_step + 1
        if self.nonfinite == "stop":
            complete, _ = checkpoints.scan(Path(self.args.output_dir))
            raise QTuneError(divergence_message(step, what, self.args.learning_rate, self.args.bf16,
                                                complete[-1] if complete else None))
        log(f"step {step} skipped: {what} (--nonfinite skip)")

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, staged so that `checkpoint-N` appears complete or not at all;
        then the oldest complete checkpoints beyond `keep_checkpoints` are deleted."""
        out = Path(self.args.output_dir)
        with checkpoints.staged_checkpoint(out, self.state.global_step) as staging:
            self._staging = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
        checkpoints.rotate(out, self.keep_checkpoints)

    def _get_output_dir(self, trial):
        # The Trainer saves a checkpoint under this folder: the staging one while _save_checkpoint runs.
        return str(self._staging) if self._staging else super()._get_output_dir(trial)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Sum of token cross-entropies over kept labels / kept tokens of the whole step.

        Logits are asked for only at positions that predict a kept label (prompt, padding and
        pruned tokens cost no vocabulary projection), and taken in float32.
        """
        labels = inputs["labels"]
        targets_mask = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][targets_mask]
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if accepts_logits_to_keep(self.accelerator.unwrap_model(model)):
            predicting = torch.zeros_like(labels, dtype=torch.bool)
            predicting[:, :-1] = targets_mask
            outputs = model(**model_inputs, logits_to_keep=predicting)
            logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        else:
            outputs = model(**model_inputs)
            logits = outputs.logits[:, :-1][targets_mask]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1))
        return (loss, outputs) if return_outputs else loss

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
        seconds = record["training_seconds"] + record["scoring_seconds"]
        record["tokens_per_second"] = record["input_tokens"] / seconds if seconds > 0 else 0.0
        record["kept_token_fraction"] = record["kept_tokens"] / max(record["response_tokens"], 1)
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **record}
        if state.is_world_process_zero:
            with open(self.trainer.step_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.trainer._since_log.append(record)
        self.trainer.step_record = {}


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


def read_step_log(path: str | Path) -> list[dict]:
    """The step records of a run. A last line cut short by a killed process is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise QTuneError(f"{path}, line {i + 1}: not a JSON record") from None
    return rows


def _truncate_step_log(path: Path, last_step: int) -> None:
    """On resume, forget steps after the checkpoint: they are about to be trained again."""
    rows = [r for r in read_step_log(path) if r["step"] <= last_step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _apply_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    target = cfg.lora_target if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _save_final_model(trainer: QTuneTrainer, tokenizer, cfg: TrainConfig, out: Path) -> Path:
    """Write OUT/model atomically: build it beside, then swap it in."""
    final, tmp = out / "model", out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.model
    if cfg.lora_r > 0 and cfg.merge_lora:
        model = model.merge_and_unload()
    with checkpoints.discard_on_failure(tmp, final):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def summarize_run(rows: list[dict], cfg: TrainConfig) -> dict:
    """Budget and wall-time summary of a run, from its step log. The final loss is that of the
    last step that was not skipped."""
    nominal = 1.0 if cfg.method == "full" else cfg.r_sample * cfg.r_token
    response = sum(r["response_tokens"] for r in rows)
    scoring = sum(r["scoring_seconds"] for r in rows)
    training = sum(r["training_seconds"] for r in rows)
    trained = [r for r in rows if not r.get("skipped")]
    return {
        "method": cfg.method,
        "steps": len(rows),
        "skipped_steps": len(rows) - len(trained),
        "nominal_budget": nominal,
        "kept_sample_fraction": sum(r["kept"] for r in rows) / max(sum(r["samples"] for r in rows), 1),
        "loss_token_fraction": sum(r["kept_tokens"] for r in rows) / max(response, 1),
        "fallback_samples": sum(r.get("fallback", 0) for r in rows),
        "scoring_seconds": scoring,
        "training_seconds": training,
        "wall_seconds": scoring + training,
        "final_loss": trained[-1]["loss"] if trained else math.nan,
    }


def _config_record(cfg: TrainConfig) -> dict:
    """The options of a run as its run_config.json holds them (JSON types: tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def _prepare_folder(cfg: TrainConfig, out: Path) -> Path | None:
    """Check the claimed OUT for this run and return the checkpoint to resume from (None for a new
    run). Refuses a new run over checkpoints, a resume without a complete checkpoint, and a resume
    whose options differ from the recorded ones beyond --allow-config-change. On resume, incomplete
    checkpoints are reported and deleted, and the step log is cut back to the checkpoint."""
    from .workflows import log

    allowed = checkpoints.allowed_changes(cfg.allow_config_change)
    checkpoints.discard_staging(out)
    complete, incomplete = checkpoints.scan(out)
    step_log = out / STEP_LOG
    config = _config_record(cfg)
    if not cfg.resume:
        if complete or incomplete:
            raise QTuneError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
        step_log.unlink(missing_ok=True)
        checkpoints.save_run_config(out, config)
        return None
    if not complete:
        found = f" (only incomplete ones: {', '.join(p.name for p in incomplete)})" if incomplete else ""
        raise QTuneError(f"--resume: no checkpoint in {out} to resume from{found}")
    checkpoints.check_run_config(out, config, allowed)
    last = complete[-1]
    if incomplete:
        log(f"--resume: skipping incomplete checkpoint(s) {', '.join(p.name for p in incomplete)} (cut short by a "
            f"crash or a full disk; deleted), resuming from {last.name}")
        for folder in incomplete:
            checkpoints.remove_checkpoint(folder)
    _truncate_step_log(step_log, checkpoints.checkpoint_step(last))
    checkpoints.save_run_config(out, config)
    return last


def run_train(cfg: TrainConfig) -> dict:
    """Train a model with `cfg` and write OUT/model, OUT/steps.jsonl and OUT/summary.json.

    OUT is claimed first (`qtune.io.claim_output_dir`): a second process on the same folder is
    refused before anything is loaded or touched."""
    with claim_output_dir(cfg.out, "qtune train"):
        return _train(cfg, Path(cfg.out))


def _train(cfg: TrainConfig, out: Path) -> dict:
    """run_train's work, in its claimed folder."""
    from .workflows import load_samples, log

    method = build_method(cfg.method, cfg)
    resume_from = _prepare_folder(cfg, out)
    step_log = out / STEP_LOG

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, pad_token=cfg.pad_token)
    pad_id = require_pad_token(tokenizer)
    records, samples = load_samples(cfg, tokenizer)
    device = resolve_device(cfg.device)
    mixed_bf16 = resolve_dtype(cfg.dtype, device) == torch.bfloat16
    if cfg.dtype == "float16":
        raise QTuneError("float16 training is not supported; use bfloat16 or float32")
    # Weights stay float32; bfloat16 means mixed precision (autocast), as in transformers.
    model = load_model(cfg.model, dtype="float32", device=str(device), trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(model, tokenizer, cfg.model)
    if cfg.lora_r > 0:
        model = _apply_lora(model, cfg)

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=mixed_bf16,
        use_cpu=device.type == "cpu",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # QTuneTrainer deletes old checkpoints itself, counting complete ones only
        logging_steps=cfg.logging_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # replaced by _PruningProgress below
    )
    trainer = QTuneTrainer(
        model=model,
        args=args,
        train_dataset=SampleDataset(samples),
        data_collator=lambda rows: collate(rows, pad_id),
        processing_class=tokenizer,
        method=method,
        pad_token_id=pad_id,
        entropy_over="attended" if cfg.reference else "response",
        chunk_tokens=cfg.chunk_tokens,
        step_log=step_log,
        nonfinite=cfg.nonfinite,
        keep_checkpoints=cfg.save_total_limit,
    )
    if cfg.progress:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_PruningProgress(trainer))
    log(f"training {cfg.model} with method {cfg.method} on {len(samples)} samples ({device}, "
        f"{'bf16 mixed' if mixed_bf16 else 'fp32'}{', LoRA r=%d' % cfg.lora_r if cfg.lora_r else ''})")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    final = _save_final_model(trainer, tokenizer, cfg, out)

    summary = summarize_run(read_step_log(step_log), cfg)
    summary.update({
        "config": asdict(cfg),
        "model_dir": str(final),
        "process_seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {device}, torch {torch.__version__}",
    })
    write_json(out / "summary.json", summary)
    if summary["skipped_steps"]:
        log(f"{summary['skipped_steps']} of {summary['steps']} steps skipped (non-finite loss, gradient norm or "
            "scores); see 'skipped' in steps.jsonl")
    log(f"nominal budget {summary['nominal_budget']:.3f} (r_sample x r_token); response tokens that received "
        f"loss: {100 * summary['loss_token_fraction']:.1f}%; samples trained: "
        f"{100 * summary['kept_sample_fraction']:.1f}%")
    log(f"wall time {summary['wall_seconds']:.1f} s = scoring {summary['scoring_seconds']:.1f} s + training "
        f"{summary['training_seconds']:.1f} s; model saved to {final}")
    return summary

"""`qtune train`: SFT with dynamic pruning from a config (`run_train`). It claims and prepares OUT
(complete checkpoints only; a --resume checked against the recorded options), loads the data, the
model (with LoRA adapters when asked) and the method, builds the Trainer's arguments for the
engine it runs on, trains with `qtune.trainer.QTuneTrainer`, and writes OUT/model (gathered by
every process: `qtune.engine.save_trained_model`), OUT/steps.jsonl (`qtune.run_log`) and
OUT/summary.json. The names of `qtune.trainer` and `qtune.run_log` that users import from here
stay here."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from . import checkpoints
from .config import TrainConfig
from .console import log
from .data import collate, require_pad_token
from .engine import check_launcher, engine_scope, save_trained_model
from .errors import QTuneError
from .io import claim_output_dir, write_json
from .methods import build_method
from .models import check_vocabulary, load_model, load_tokenizer, machine_stamp, resolve_device, resolve_dtype
from .objectives import Objective
from .processes import launcher_world_size
from .reference_policy import reference_policy
from .run_log import STEP_LOG, read_step_log, summarize_run, truncate_step_log
from .samples import load_samples
from .scorer import build_scorer
from .step import pack_kept
from .trainer import (METHOD_STATE, TOKEN_MASKS, QTuneTrainer, SampleDataset, _PruningProgress, read_token_masks,
                      write_token_masks)

__all__ = ["METHOD_STATE", "QTuneTrainer", "STEP_LOG", "TOKEN_MASKS", "apply_lora", "pack_kept", "read_step_log",
           "read_token_masks", "run_train", "summarize_run", "truncate_step_log", "write_token_masks"]


def apply_lora(model, *, r: int, alpha: float, dropout: float, target: str):
    """`model` with LoRA adapters of rank `r` on the modules named in `target` (comma-separated, or
    all-linear); QTuneError when the model has none of them."""
    from peft import LoraConfig, get_peft_model

    modules = target if target == "all-linear" else [t.strip() for t in target.split(",")]
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise QTuneError(f"LoRA on {target!r}: {str(exc).strip().splitlines()[0]}") from exc


def _config_record(cfg: TrainConfig) -> dict:
    """The options of a run as its run_config.json holds them (JSON types: tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def prepare_folder(cfg: TrainConfig, out: Path) -> Path | None:
    """Check the claimed OUT for this run and return the checkpoint to resume from (None for a new
    run). Refuses a new run over checkpoints, a resume without a complete checkpoint, and a resume
    whose options differ from the recorded ones beyond --allow-config-change. On resume, incomplete
    checkpoints are reported and deleted (`QTuneTrainer.train` cuts the step log back)."""

    allowed = checkpoints.allowed_changes(cfg.allow_config_change)
    checkpoints.discard_staging(out)
    complete, incomplete = checkpoints.scan(out)
    config = _config_record(cfg)
    if not cfg.resume:
        if complete or incomplete:
            raise QTuneError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
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
    checkpoints.save_run_config(out, config)
    return last


# transformers 5 renames `gradient_checkpointing` to `activation_checkpointing` (the old name warns).
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                  else "gradient_checkpointing")


def _training_arguments(cfg: TrainConfig, out: Path, device: torch.device, mixed_bf16: bool) -> TrainingArguments:
    """The Trainer's arguments of a run. Under torchrun or accelerate, creating them joins the
    process group (gloo on CPU)."""
    return TrainingArguments(
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
        # Several CPU processes (torchrun and accelerate set WORLD_SIZE) reduce over gloo.
        ddp_backend="gloo" if device.type == "cpu" and launcher_world_size() > 1 else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # QTuneTrainer deletes old checkpoints itself, counting complete ones only
        logging_steps=cfg.logging_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # replaced by _PruningProgress below
        **{CHECKPOINTING: cfg.gradient_checkpointing},
        ddp_find_unused_parameters=cfg.ddp_find_unused_parameters,
        fsdp=cfg.fsdp or "",
        fsdp_config=cfg.fsdp_config,
        deepspeed=cfg.deepspeed,
    )


def run_train(cfg: TrainConfig) -> dict:
    """Train a model with `cfg` and write OUT/model, OUT/steps.jsonl and OUT/summary.json.

    OUT is claimed first (`qtune.io.claim_output_dir`): a second run on the same folder is
    refused before anything is loaded or touched. Under several processes (torchrun, accelerate
    launch) the main process claims it and prepares it before the others read it."""
    if cfg.dtype == "float16":
        raise QTuneError("float16 training is not supported; use bfloat16 or float32")
    check_launcher(cfg.deepspeed)
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    with engine_scope():
        args = _training_arguments(cfg, out, device, resolve_dtype(cfg.dtype, device) == torch.bfloat16)
        main = args.should_save
        with claim_output_dir(cfg.out, "qtune train") if main else contextlib.nullcontext():
            with args.main_process_first(desc="preparing the output folder"):
                resume_from = prepare_folder(cfg, out) if main else resume_point(cfg, out)
            return _train(cfg, out, args, resume_from)


def resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from, in a folder the main process has prepared."""
    return checkpoints.scan(out)[0][-1] if cfg.resume else None


def _train(cfg: TrainConfig, out: Path, args: TrainingArguments, resume_from: Path | None) -> dict:
    """run_train's work, in its prepared folder."""

    method = build_method(cfg.method, cfg)
    step_log = out / STEP_LOG
    main = args.should_save

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, pad_token=cfg.pad_token)
    pad_id = require_pad_token(tokenizer)
    records, samples = load_samples(cfg, tokenizer)
    if method.needs_metadata:
        method.bind_records({r.sample_id: r.metadata for r in records})
    # Weights stay float32 (bfloat16 means mixed precision, as in transformers), on the CPU: the
    # Trainer moves them to this process's device.
    model = load_model(cfg.model, dtype="float32", device="cpu", trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(model, tokenizer, cfg.model)
    if cfg.lora_r > 0:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target=cfg.lora_target)
    objective = Objective.of(cfg)
    # ASFT without adapters to disable anchors to a frozen copy of the starting weights, loaded as
    # Rho-1's reference model is (qtune.scorer.build_scorer).
    reference = reference_policy(objective, model, lambda: load_model(
        cfg.model, dtype=cfg.dtype, device=str(args.device), trust_remote_code=cfg.trust_remote_code))

    trainer = QTuneTrainer(
        model=model,
        args=args,
        train_dataset=SampleDataset(samples),
        data_collator=lambda rows: collate(rows, pad_id),
        processing_class=tokenizer,
        method=method,
        pad_token_id=pad_id,
        triage_scope=cfg.triage_scope,
        chunk_tokens=cfg.chunk_tokens,
        head_impl=cfg.head_impl,
        kept_row_layout=cfg.kept_row_layout,
        log_token_masks=cfg.log_token_masks,
        scorer=build_scorer(cfg, tokenizer, args.device, needs=method.needs, dtype=cfg.dtype,
                            trust_remote_code=cfg.trust_remote_code),
        pass_scorer=lambda device: build_scorer(cfg, tokenizer, device, needs=method.pass_needs, dtype=cfg.dtype,
                                                trust_remote_code=cfg.trust_remote_code, training_set_pass=True),
        objective=objective,
        reference=reference,
        step_log=step_log,
        nonfinite=cfg.nonfinite,
        keep_checkpoints=cfg.save_total_limit,
        progress=cfg.progress,
    )
    if cfg.progress and main:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_PruningProgress(trainer))
    if main:
        log(f"training {cfg.model} with method {cfg.method} on {len(samples)} samples ({args.device}"
            f"{f' x {args.world_size} processes' if args.world_size > 1 else ''}, "
            f"{'bf16 mixed' if args.bf16 else 'fp32'}{', LoRA r=%d' % cfg.lora_r if cfg.lora_r else ''})")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    # Every process joins the save (the weights are gathered); the step log is complete by then.
    final = save_trained_model(trainer.accelerator, trainer.model_wrapped, tokenizer, out / "model",
                               merge_lora=cfg.merge_lora)

    summary = summarize_run(read_step_log(step_log), method)
    if trainer.pass_seconds is not None:
        summary["training_set_pass_seconds"] = trainer.pass_seconds
    summary.update({
        "config": asdict(cfg),
        "model_dir": str(final),
        "process_seconds": time.perf_counter() - started,
        "engine": trainer.engine,
        "processes": args.world_size,
        "machine": machine_stamp(args.device, args.world_size),
    })
    if not main:
        return summary
    write_json(out / "summary.json", summary)
    if summary["skipped_steps"]:
        log(f"{summary['skipped_steps']} of {summary['steps']} steps skipped (non-finite loss, gradient norm or "
            "scores); see 'skipped' in steps.jsonl")
    log(f"nominal budget {summary['nominal_budget']:.3f} (the method's); response tokens that received "
        f"loss: {100 * summary['loss_token_fraction']:.1f}%; samples trained: "
        f"{100 * summary['kept_sample_fraction']:.1f}%")
    before = (f", after a pass over the training set of {trainer.pass_seconds:.1f} s"
              if trainer.pass_seconds is not None else "")
    log(f"wall time {summary['wall_seconds']:.1f} s = scoring {summary['scoring_seconds']:.1f} s + training "
        f"{summary['training_seconds']:.1f} s{before}; model saved to {final}")
    return summary

"""The audit's optional dynamic run (`--steps K --method NAME`): K real training steps of the
method on the planted sample (`qtune train` into OUT/dynamic, its step log with token masks),
whose decisions are audited step by step as the model moves, with the same counts as the static
audit: each appearance of a sample in a step is one decision (`qtune.report.pruning_audit`), and
the kept samples' token masks give the pruned planted and other tokens (`tally_tokens`)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..config import AuditConfig, TrainConfig
from ..run_log import read_step_log
from ..train import run_train


def train_config(cfg: AuditConfig, planted: Path, out: Path) -> TrainConfig:
    """The run's TrainConfig: every audit option that qtune train has too (model, data and compute
    options, the method's options, r_sample, r_token, seed, batch_size, lr, lora_r, progress),
    on the planted sample, for cfg.steps steps, logging token masks, without checkpoints."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    values.update(data=str(planted), format="messages", limit=None, skip_invalid=False, out=str(out),
                  max_steps=cfg.steps, log_token_masks=True, save_steps=10**9, save_total_limit=1, resume=False,
                  report_to="none")
    return TrainConfig(**values)


def dynamic_steps(cfg: AuditConfig, planted: Path, out: Path) -> list[dict]:
    """Train (a previous audit's run in `out` is replaced) and return the run's step rows."""
    shutil.rmtree(out, ignore_errors=True)
    run_train(train_config(cfg, planted, out))
    return read_step_log(out / "steps.jsonl")


def kept_tokens(steps: list[dict]) -> Iterable[tuple[int, list[bool]]]:
    """(sample id, whether each response token was pruned) of every kept sample of every step."""
    for row in steps:
        for sample_id, mask in row.get("kept_token_masks", {}).items():
            yield int(sample_id), [bit == "0" for bit in mask]

"""A training run's step log (OUT/steps.jsonl, one JSON record per optimizer step) and the summary
made from it: reading (a last line cut short by a killed process is ignored), cutting back on
--resume, and the run's budget and wall-time summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import QTuneError
from .io import write_text
from .methods import Method


STEP_LOG = "steps.jsonl"


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


def truncate_step_log(path: Path, last_step: int) -> None:
    """On resume, forget steps after the checkpoint: they are about to be trained again."""
    rows = [r for r in read_step_log(path) if r["step"] <= last_step]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _sum_phases(rows: list[dict], key: str, combine) -> dict:
    """Per phase, `combine` (sum of seconds, max of peaks) over the steps that recorded it."""
    names = sorted({name for r in rows for name in r.get(key, {})})
    return {name: combine(r[key][name] for r in rows if name in r.get(key, {})) for name in names}


def summarize_run(rows: list[dict], method: Method) -> dict:
    """Budget and wall-time summary of a run, from its step log; the nominal budget is the
    method's. The final loss is that of the last step that was not skipped."""
    response = sum(r["response_tokens"] for r in rows)
    scoring = sum(r["scoring_seconds"] for r in rows)
    training = sum(r["training_seconds"] for r in rows)
    trained = [r for r in rows if not r.get("skipped")]
    return {
        "method": method.name,
        "steps": len(rows),
        "skipped_steps": len(rows) - len(trained),
        "nominal_budget": method.nominal_budget,
        "kept_sample_fraction": sum(r["kept"] for r in rows) / max(sum(r["samples"] for r in rows), 1),
        "loss_token_fraction": sum(r["kept_tokens"] for r in rows) / max(response, 1),
        "fallback_samples": sum(r.get("fallback", 0) for r in rows),
        "scoring_seconds": scoring,
        "training_seconds": training,
        "wall_seconds": scoring + training,
        "phase_seconds": _sum_phases(rows, "phase_seconds", sum),
        "phase_peak_mib": _sum_phases(rows, "phase_peak_mib", max),
        "final_loss": trained[-1]["loss"] if trained else math.nan,
    }

"""Running the cells of a bench grid.

Every cell (method, r_sample, r_token, seed) trains the base model into OUT/cells/<cell>/train,
evaluates it into OUT/cells/<cell>/eval and writes OUT/cells/<cell>/result.json atomically as its
last act; the parent process then appends the same row to OUT/results.jsonl. A crash therefore
loses at most the cells in progress, and a second run skips every cell that has its result.json (a
cell folder without one is cleaned and run again). Cells run one at a time, or in worker processes
with `--jobs`; a cell that reads another cell's run (`Cell.source`: token_matched_random reads the
qtuning cell of its budget and seed) starts only once that cell has ended.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from ..config import EvalRunConfig, TrainConfig
from ..data import IGNORE_INDEX
from ..errors import QTuneError
from ..io import read_jsonl, write_json
from .grid import BenchConfig, Cell
from .results import (append_result, cell_folder, check_settings, finished_row, resolve_settings,
                      sync_results)


def train_config(cell: Cell, settings: dict, out: str | Path):
    """The cell's TrainConfig (training into OUT/cells/<cell>/train, `out` being the bench's OUT):
    every bench option of the same name, plus the cell's own values, and for a cell with a source
    (`Cell.source`) that cell's train folder as `match_run`."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in settings.items() if k in names}
    if cell.source is not None:
        values["match_run"] = str(cell_folder(out, cell.source) / "train")
    values.update(
        out=str(cell_folder(out, cell) / "train"), method=cell.method, r_sample=cell.r_sample, r_token=cell.r_token,
        seed=cell.seed, log_token_masks=True,  # for the token-level audit (`qtune.report.token_audit`)
        # The bench resumes by cell, not inside a cell: no checkpoint is ever needed.
        save_steps=10**9, save_total_limit=1, resume=False, progress=False, report_to="none",
        merge_lora=True,  # evaluation loads plain weights
    )
    return TrainConfig(**values)


def eval_config(settings: dict, model_dir: Path, out: Path):
    return EvalRunConfig(
        model=str(model_dir), data=settings["eval_data"], out=str(out), format="auto",
        max_length=settings["max_length"], dtype=settings["dtype"], device=settings["device"],
        trust_remote_code=settings["trust_remote_code"], pad_token=settings["pad_token"],
        max_new_tokens=settings["max_new_tokens"], batch_size=settings["eval_batch_size"],
        limit=settings["eval_limit"], num_fewshot=settings["num_fewshot"],
        fewshot_data=settings["data"] if settings["num_fewshot"] > 0 else None,
        perplexity=settings["perplexity"],
    )


@dataclasses.dataclass(frozen=True)
class TrainingLabels:
    """What the audits of every cell read from the training set, computed once per bench run.

    `categories`: sample_id -> metadata.category; `kinds`: sample_id -> "category/kind"
    (metadata.kind, e.g. "teacher_error/dropped_step"); each None when no record has the field.
    `roles`: sample_id -> the role of each of its response tokens with the training's tokenisation
    (`qtune.report.response_token_roles`: final line, other, special); None without kinds, since
    the token-level audit is per kind.
    """

    categories: dict[int, str] | None
    kinds: dict[int, str] | None
    roles: dict[int, str] | None


def training_labels(settings: dict) -> TrainingLabels:
    """Read (and, for the token roles, tokenize) the training set once."""
    from ..data import load_records, tokenize_records
    from ..models import load_tokenizer
    from ..report import response_token_roles

    records, _ = load_records(settings["data"], settings["format"], limit=settings["limit"])
    categories = {r.sample_id: str(r.metadata.get("category", "none")) for r in records}
    kinds = {r.sample_id: f"{categories[r.sample_id]}/{r.metadata.get('kind', 'none')}" for r in records}
    has_categories = any("category" in r.metadata for r in records)
    if not any("kind" in r.metadata for r in records):
        return TrainingLabels(categories if has_categories else None, None, None)
    tokenizer = load_tokenizer(settings["model"], trust_remote_code=settings["trust_remote_code"],
                               pad_token=settings["pad_token"])
    samples, _ = tokenize_records(records, tokenizer, max_length=settings["max_length"])
    roles = {}
    for sample in samples:
        ids = [int(i) for i, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]
        roles[int(sample["sample_id"])] = response_token_roles(
            tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True))
    return TrainingLabels(categories if has_categories else None, kinds, roles)


def result_row(cell: Cell, summary: dict, steps: list[dict], metrics: dict, audit: dict | None,
               seconds: float, audit_kind: dict | None = None, audit_tokens: dict | None = None,
               accuracy_by_difficulty: dict | None = None) -> dict:
    """The cell's row of results.jsonl."""
    return {
        "cell": cell.name,
        "method": cell.method,
        "r_sample": cell.r_sample,
        "r_token": cell.r_token,
        "seed": cell.seed,
        "data_seed": cell.data_seed,
        "nominal_budget": summary["nominal_budget"],
        "exact_match_strict": metrics["exact_match_strict"],
        "exact_match_flexible": metrics["exact_match_flexible"],
        "perplexity": metrics.get("perplexity"),
        "n_eval": metrics["n"],
        "steps": summary["steps"],
        "kept_sample_fraction": summary["kept_sample_fraction"],
        "loss_token_fraction": summary["loss_token_fraction"],
        "loss_tokens": sum(r["kept_tokens"] for r in steps),
        "response_tokens": sum(r["response_tokens"] for r in steps),
        "scoring_seconds": summary["scoring_seconds"],
        "training_seconds": summary["training_seconds"],
        "wall_seconds": summary["wall_seconds"],
        "phase_seconds": summary.get("phase_seconds", {}),
        "eval_seconds": metrics["seconds"],
        "cell_seconds": seconds,
        "final_loss": summary["final_loss"],
        "format_compliance": 1 - metrics["invalid_strict"],
        "accuracy_by_difficulty": accuracy_by_difficulty,
        "audit": audit,
        "audit_kind": audit_kind,
        "audit_tokens": audit_tokens,
        "machine": summary["machine"],  # with torch's CPU threads: a CPU cell repeats exactly only at that count
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_cell(cell: Cell, settings: dict, out: str | Path, keep_model: bool = False,
             labels: TrainingLabels | None = None) -> dict:
    """Train and evaluate one cell in OUT/cells/<cell>/, whatever is there; return its result row.
    `labels`: the training set's (`training_labels`), read here when not given.

    The cell's own output (training and evaluation logs, progress bars) goes to its cell.log.
    """
    import gc

    from ..report import accuracy_by, pruning_audit, token_audit
    from ..run_log import read_step_log
    from ..train import run_train
    from ..workflows import run_eval

    cell_dir = cell_folder(out, cell)
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    if cell.source is not None and finished_row(Path(out), cell.source) is None:
        raise QTuneError(f"{cell.method} keeps as many loss tokens as cell {cell.source.name} did, which has not "
                         "finished (it failed, or did not run); run the grid again once it has")
    started = time.perf_counter()
    with open(cell_dir / "cell.log", "w", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        summary = run_train(train_config(cell, settings, out))
        for checkpoint in (cell_dir / "train").glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        metrics = run_eval(eval_config(settings, cell_dir / "train" / "model", cell_dir / "eval"))
        if not keep_model:
            shutil.rmtree(cell_dir / "train" / "model")
        gc.collect()
    steps = read_step_log(cell_dir / "train" / "steps.jsonl")
    labels = labels or training_labels(settings)
    audit = pruning_audit(steps, labels.categories) if labels.categories else None
    audit_kind = pruning_audit(steps, labels.kinds) if labels.kinds else None
    audit_tokens = token_audit(steps, labels.kinds, labels.roles) if labels.kinds else None
    by_difficulty = accuracy_by(read_jsonl(cell_dir / "eval" / "predictions.jsonl"), "difficulty")
    row = result_row(cell, summary, steps, metrics, audit, time.perf_counter() - started, audit_kind, audit_tokens,
                     by_difficulty)
    write_json(cell_dir / "result.json", row)
    return row


def _run_cell_reporting_errors(cell: Cell, settings: dict, out: str, keep_model: bool,
                               labels: TrainingLabels) -> tuple[dict | None, str]:
    """run_cell for the grid: a failure is returned as a message (its traceback goes to the cell's
    log), so that one bad cell does not stop the others, and nothing unpicklable crosses processes."""
    try:
        return run_cell(cell, settings, out, keep_model, labels), ""
    except Exception as exc:  # noqa: BLE001 -- reported per cell, the grid goes on
        log_path = cell_folder(out, cell) / "cell.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(traceback.format_exc())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, message


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _check_cell_configs(cells: list[Cell], draws: dict[int, dict], out: Path) -> None:
    """Build every cell's TrainConfig and the evaluation configs (building checks them), so that
    settings no cell can run with fail now, in one line, not in every cell after the first ones
    have trained. `draws`: the settings of each draw of the data (`resolve_settings`)."""
    for cell in cells:
        try:
            train_config(cell, draws[cell.data_seed], out)
        except QTuneError as exc:
            raise QTuneError(f"cell {cell.name}: {exc}") from None
    for settings in draws.values():
        eval_config(settings, out / "model", out / "eval")  # the same for every cell of a draw, but for these paths


def keeps_model(cfg: BenchConfig, cell: Cell) -> bool:
    """Whether the cell's trained model stays in OUT/cells/<cell>/train/model once evaluated
    (`--keep-models`, or `--keep-models-of` naming its method)."""
    return cfg.keep_models or cell.method == cfg.keep_models_of


def run_cells(cells: list[Cell], cfg: BenchConfig, out: Path) -> list[str]:
    """Run the cells that have no result yet; return the names of those that failed."""
    draws = {d: resolve_settings(cfg, d) for d in dict.fromkeys(cell.data_seed for cell in cells)}
    _check_cell_configs(cells, draws, out)
    # The preset's own draw's settings: the other draws' follow from them and the data seed.
    check_settings(out, draws[0] if 0 in draws else resolve_settings(cfg))
    sync_results(out)
    metric = f"exact_match_{cfg.metric}"
    pending, done = [], 0
    for cell in cells:
        row = finished_row(out, cell)
        if row is None:
            pending.append(cell)
        else:
            done += 1
            print(f"[{done}/{len(cells)}] {cell.label} ... done earlier: acc {100 * row[metric]:.1f}%", flush=True)
    progress = _Progress(out, done, len(cells), metric)
    labels = {d: training_labels(draws[d]) for d in dict.fromkeys(cell.data_seed for cell in pending)}
    if cfg.jobs == 1:
        for cell in pending:
            print(progress.start(cell), end=" ", flush=True)
            print(progress.finish(cell, *_run_cell_reporting_errors(cell, draws[cell.data_seed], str(out),
                                                                     keeps_model(cfg, cell), labels[cell.data_seed])),
                  flush=True)
    elif pending:
        _run_parallel(pending, draws, out, cfg, progress, labels)
    return progress.failures


class _Progress:
    """Counts finished cells, appends their rows to results.jsonl and words the progress lines."""

    def __init__(self, out: Path, done: int, total: int, metric: str):
        self.out, self.done, self.total, self.metric = out, done, total, metric
        self.failures: list[str] = []

    def start(self, cell: Cell) -> str:
        return f"[{self.done + 1}/{self.total}] {cell.label} ..."

    def finish(self, cell: Cell, row: dict | None, error: str) -> str:
        """Record a finished cell; the end of its progress line."""
        self.done += 1
        if row is None:
            self.failures.append(cell.name)
            return f"FAILED: {error} (see cells/{cell.name}/cell.log)"
        append_result(self.out, row)
        return f"acc {100 * row[self.metric]:.1f}% in {row['cell_seconds']:.0f} s"


def _cpu_count() -> int:
    """CPUs this process may run on (a container may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_parallel(pending: list[Cell], draws: dict[int, dict], out: Path, cfg: BenchConfig, progress: _Progress,
                  labels: dict[int, TrainingLabels]) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, _cpu_count() // cfg.jobs)
    # A cell whose source cell is pending too waits for it to end (whether it failed or not: a
    # failed source fails it at once, with a message saying so).
    queued = set(pending)
    waiting: dict[Cell, list[Cell]] = {}
    for cell in pending:
        if cell.source in queued:
            waiting.setdefault(cell.source, []).append(cell)
    # spawn, not fork: the parent has torch loaded, and forking its thread pools is unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(cfg.jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {}

        def submit(cells: list[Cell]) -> None:
            for cell in cells:
                futures[pool.submit(_run_cell_reporting_errors, cell, draws[cell.data_seed], str(out),
                                    keeps_model(cfg, cell), labels[cell.data_seed])] = cell

        submit([cell for cell in pending if cell.source not in queued])
        try:
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    cell = futures.pop(future)
                    line = progress.start(cell)
                    print(line, progress.finish(cell, *future.result()), flush=True)
                    submit(waiting.pop(cell, []))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        except BrokenProcessPool:
            raise QTuneError("a cell's process died without a Python error (out of memory? killed?); the cells "
                             "that finished are kept: run the same command again, perhaps with fewer --jobs") from None

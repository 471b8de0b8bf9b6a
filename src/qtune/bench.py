"""`qtune bench`: the benchmark grid of methods x budgets x seeds, and its reports.

Every cell of the grid (method, r_sample, r_token, seed) trains the base model into
OUT/cells/<cell>/train, evaluates it into OUT/cells/<cell>/eval and writes OUT/cells/<cell>/result.json
atomically as its last act; the parent process then appends the same row to OUT/results.jsonl. A
crash therefore loses at most the cells in progress, and a second run skips every cell that has its
result.json (a cell folder without one is cleaned and run again).

The reports (results.md, results.csv, plots/, report.html) are built from results.jsonl at the end
of a run, or alone with `--report-only`. See docs/bench.md.

This module's top level imports nothing heavy, so that `qtune --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from .config import OptimConfig, TokenPruningConfig, add_arguments, build_config, check_device, option
from .errors import QTuneError

DEFAULT_BUDGETS = "0.125x0.5,0.125x0.7,0.25x0.5,0.25x0.7,0.5x0.5,0.5x0.7"
FULL = "full"
#: The budget whose Q2 samples the HTML report shows with their pruned tokens, when it is in the grid.
EXAMPLE_BUDGET = (0.25, 0.7)


@dataclass
class BenchConfig(OptimConfig, TokenPruningConfig):
    """Options of `qtune bench`. Training and evaluation options are passed to every cell."""

    out: str = option("runs/bench", "Output folder: cells/, results.jsonl, results.md, results.csv, plots/, "
                                    "report.html.")
    model: str | None = option(None, "Base model (local folder or hub id); default: the testbed's tiny model.")
    data: str | None = option(None, "Training data file; default: the testbed's training set.")
    eval_data: str | None = option(None, "Held-out evaluation data (GSM8K-style answers); default: the "
                                         "testbed's test set.")
    # The grid.
    methods: str | None = option(None, "Comma-separated pruning methods; default: every registered method "
                                       "(full runs once per seed, the others once per budget and seed).")
    budgets: str = option(DEFAULT_BUDGETS, "Comma-separated budgets r_sample x r_token, e.g. 0.25x0.7,0.125x0.5.")
    seeds: str = option("0,1,2", "Comma-separated training seeds.")
    jobs: int = option(1, "Cells run at once, each in its own process with cpu_count // jobs torch threads.",
                       bounds="[1, inf)")
    # Reports.
    report_only: bool = option(False, "Only rebuild the reports from OUT/results.jsonl; train nothing.")
    metric: str = option("strict", "Exact-match filter the reports rank and plot by.", choices=["strict", "flexible"])
    examples: int = option(3, "Q2 samples shown with their pruned tokens in report.html (0: none).",
                           bounds="[0, inf)")
    plots: bool = option(True, "Draw the plots and score the training set with the base model for the EU-plane "
                               "figures and the token examples (needs matplotlib).")
    keep_models: bool = option(False, "Keep each cell's trained model in OUT/cells/<cell>/train/model "
                                      "(deleted once evaluated by default).")
    # Model and data, as in `qtune train`.
    dtype: str = option("auto", "Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.",
                        choices=["auto", "float32", "bfloat16"])
    device: str = option("auto", "Device: auto, cpu, cuda, cuda:N.", check=check_device)
    trust_remote_code: bool = option(False, "Run code shipped with the model. Off unless you trust its source.")
    pad_token: str | None = option(None, "Token to use for padding when the tokenizer has none (e.g. its EOS).")
    format: str = option("auto", "Record format of the training data; the evaluation data's is detected.",
                         choices=["auto", "alpaca", "prompt_completion", "question_answer", "messages", "sharegpt"])
    max_length: int = option(1024, "Maximum tokens per sample, in training and perplexity; longer ones are cut.",
                             bounds="[2, inf)")
    limit: int | None = option(None, "Train on the first N training records only.", bounds="[1, inf)")
    # Evaluation, as in `qtune eval`.
    max_new_tokens: int = option(256, "Most tokens generated per evaluation question.", bounds="[1, inf)")
    eval_batch_size: int = option(16, "Prompts generated at once in evaluation.", bounds="[1, inf)")
    eval_limit: int | None = option(None, "Evaluate on the first N evaluation records only.", bounds="[1, inf)")
    num_fewshot: int = option(0, "Solved training examples prepended to each evaluation prompt.", bounds="[0, inf)")
    perplexity: bool = option(True, "Also compute the held-out perplexity of the reference answers.")


#: Options that choose which cells run and how results are reported: changing them between two runs
#: into the same OUT does not change any cell's result. Every other option does.
NOT_RESULT_OPTIONS = frozenset({"out", "methods", "budgets", "seeds", "jobs", "report_only", "metric", "examples",
                                "plots", "keep_models"})
SETTINGS_FILE = "bench.json"
RESULTS_FILE = "results.jsonl"


# --------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Cell:
    """One training and evaluation run of the grid. `full` has r_sample = r_token = 1."""

    method: str
    r_sample: float
    r_token: float
    seed: int

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. qtuning-r0.25x0.7-seed1 or full-seed0."""
        if self.method == FULL:
            return f"{FULL}-seed{self.seed}"
        return f"{self.method}-r{self.r_sample:g}x{self.r_token:g}-seed{self.seed}"

    @property
    def label(self) -> str:
        if self.method == FULL:
            return f"{FULL} seed={self.seed}"
        return f"{self.method} r_sample={self.r_sample:g} r_token={self.r_token:g} seed={self.seed}"


def parse_budgets(text: str) -> list[tuple[float, float]]:
    """'0.25x0.7,0.125x0.5' -> [(0.25, 0.7), (0.125, 0.5)], each ratio in (0, 1], duplicates dropped."""
    budgets = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        pieces = part.lower().split("x")
        try:
            r_sample, r_token = (float(p) for p in pieces)
        except ValueError:
            raise QTuneError(f"--budgets: {part!r} is not r_samplexr_token (e.g. 0.25x0.7)") from None
        if not (0 < r_sample <= 1 and 0 < r_token <= 1):
            raise QTuneError(f"--budgets: {part!r}: both ratios must be in (0, 1]")
        if (r_sample, r_token) not in budgets:
            budgets.append((r_sample, r_token))
    if not budgets:
        raise QTuneError("--budgets: no budget given")
    return budgets


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2], duplicates dropped."""
    try:
        seeds = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise QTuneError(f"--seeds: {text!r} is not a comma-separated list of integers") from None
    if not seeds:
        raise QTuneError("--seeds: no seed given")
    return list(dict.fromkeys(seeds))


def parse_methods(text: str | None) -> list[str]:
    """The methods to run, `full` first; every registered method when `text` is None."""
    from .methods import METHODS

    names = list(METHODS) if text is None else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise QTuneError(f"--methods: unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(METHODS))}")
    if not names:
        raise QTuneError("--methods: no method given")
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda m: m != FULL)


def build_grid(methods: list[str], budgets: list[tuple[float, float]], seeds: list[int]) -> list[Cell]:
    """Seed by seed (so an early stop still has complete seeds), full first, then budget by budget."""
    cells = []
    for seed in seeds:
        if FULL in methods:
            cells.append(Cell(FULL, 1.0, 1.0, seed))
        for r_sample, r_token in budgets:
            cells.extend(Cell(m, r_sample, r_token, seed) for m in methods if m != FULL)
    return cells


# --------------------------------------------------------------------------------------------- settings


def _resolve_path(path: str) -> str:
    """Absolute path for local files and folders; a hub id stays as it is."""
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


def resolve_settings(cfg: BenchConfig) -> dict:
    """Every option that determines a cell's result, with model and data resolved (the testbed's
    model and data stand in for any not given)."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_RESULT_OPTIONS}
    if None in (cfg.model, cfg.data, cfg.eval_data):
        from .testbed import build_testbed

        paths = build_testbed()
        defaults = {"model": paths.model_dir, "data": paths.train_path, "eval_data": paths.test_path}
        settings.update({k: str(v) for k, v in defaults.items() if settings[k] is None})
    for key in ("model", "data", "eval_data"):
        settings[key] = _resolve_path(settings[key])
    return settings


def _check_settings(out: Path, settings: dict) -> None:
    """A second run into the same OUT must use the settings its finished cells were made with."""
    from .io import write_json

    path = out / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        # An option added to qtune after that run was made behaved as its default there.
        defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
        old = {**{k: defaults.get(k) for k in settings}, **old}
        changed = [f"{k} ({old.get(k)!r} before, {settings.get(k)!r} now)" for k in sorted(set(old) | set(settings))
                   if old.get(k) != settings.get(k)]
        if changed:
            raise QTuneError(f"{out} holds a bench run with other settings: {'; '.join(changed)}; "
                             "use another --out, or the same options")
    else:
        write_json(path, settings)


def load_settings(out: Path) -> dict:
    path = out / SETTINGS_FILE
    if not path.exists():
        raise QTuneError(f"{out} holds no bench run ({SETTINGS_FILE} is missing)")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- one cell


def train_config(cell: Cell, settings: dict, out: Path):
    """The cell's TrainConfig: every bench option of the same name, plus the cell's own values."""
    from .config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in settings.items() if k in names}
    values.update(
        out=str(out), method=cell.method, r_sample=cell.r_sample, r_token=cell.r_token, seed=cell.seed,
        # The bench resumes by cell, not inside a cell: no checkpoint is ever needed.
        save_steps=10**9, save_total_limit=1, resume=False, progress=False, report_to="none",
        merge_lora=True,  # evaluation loads plain weights
    )
    return TrainConfig(**values)


def eval_config(settings: dict, model_dir: Path, out: Path):
    from .config import EvalRunConfig

    return EvalRunConfig(
        model=str(model_dir), data=settings["eval_data"], out=str(out), format="auto",
        max_length=settings["max_length"], dtype=settings["dtype"], device=settings["device"],
        trust_remote_code=settings["trust_remote_code"], pad_token=settings["pad_token"],
        max_new_tokens=settings["max_new_tokens"], batch_size=settings["eval_batch_size"],
        limit=settings["eval_limit"], num_fewshot=settings["num_fewshot"],
        fewshot_data=settings["data"] if settings["num_fewshot"] > 0 else None,
        perplexity=settings["perplexity"],
    )


def training_categories(settings: dict) -> dict[int, str] | None:
    """sample_id -> metadata.category of the training records, or None when no record has one."""
    from .data import load_records

    records, _ = load_records(settings["data"], settings["format"], limit=settings["limit"])
    if not any("category" in r.metadata for r in records):
        return None
    return {r.sample_id: str(r.metadata.get("category", "none")) for r in records}


def result_row(cell: Cell, summary: dict, steps: list[dict], metrics: dict, audit: dict | None,
               seconds: float) -> dict:
    """The cell's row of results.jsonl."""
    return {
        "cell": cell.name,
        "method": cell.method,
        "r_sample": cell.r_sample,
        "r_token": cell.r_token,
        "seed": cell.seed,
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
        "eval_seconds": metrics["seconds"],
        "cell_seconds": seconds,
        "final_loss": summary["final_loss"],
        "audit": audit,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_cell(cell: Cell, settings: dict, out: str | Path, keep_model: bool = False) -> dict:
    """Train and evaluate one cell in OUT/cells/<cell>/, whatever is there; return its result row.

    The cell's own output (training and evaluation logs, progress bars) goes to its cell.log.
    """
    import gc

    from .io import write_json
    from .report import pruning_audit
    from .train import read_step_log, run_train
    from .workflows import run_eval

    cell_dir = Path(out) / "cells" / cell.name
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    started = time.perf_counter()
    with open(cell_dir / "cell.log", "w", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
        summary = run_train(train_config(cell, settings, cell_dir / "train"))
        for checkpoint in (cell_dir / "train").glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
        metrics = run_eval(eval_config(settings, cell_dir / "train" / "model", cell_dir / "eval"))
        if not keep_model:
            shutil.rmtree(cell_dir / "train" / "model")
        gc.collect()
    steps = read_step_log(cell_dir / "train" / "steps.jsonl")
    categories = training_categories(settings)
    audit = pruning_audit(steps, categories) if categories else None
    row = result_row(cell, summary, steps, metrics, audit, time.perf_counter() - started)
    write_json(cell_dir / "result.json", row)
    return row


def _run_cell_reporting_errors(cell: Cell, settings: dict, out: str, keep_model: bool) -> tuple[dict | None, str]:
    """run_cell for the grid: a failure is returned as a message (its traceback goes to the cell's
    log), so that one bad cell does not stop the others, and nothing unpicklable crosses processes."""
    try:
        return run_cell(cell, settings, out, keep_model), ""
    except Exception as exc:  # noqa: BLE001 -- reported per cell, the grid goes on
        log_path = Path(out) / "cells" / cell.name / "cell.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(traceback.format_exc())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, message


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- results


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file that a killed process may have left with a partial line
    (which is skipped). Missing file: no records."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_results(path: str | Path) -> list[dict]:
    """Rows of results.jsonl, the last row of each cell winning."""
    return list({row["cell"]: row for row in _read_jsonl(Path(path))}.values())


def _finished(out: Path, cell: Cell) -> dict | None:
    path = out / "cells" / cell.name / "result.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def sync_results(out: Path) -> list[dict]:
    """Rewrite results.jsonl from the cells on disk: a cell folder with result.json gives its row, a
    folder without one (a cell that did not finish) gives none, and rows of cells whose folder is
    gone are kept."""
    from .io import write_jsonl

    by_cell = {}
    for row in read_results(out / RESULTS_FILE):
        if not (out / "cells" / row["cell"]).exists():
            by_cell[row["cell"]] = row
    for path in sorted((out / "cells").glob("*/result.json")):
        row = json.loads(path.read_text(encoding="utf-8"))
        by_cell[row["cell"]] = row
    rows = list(by_cell.values())
    write_jsonl(out / RESULTS_FILE, rows)
    return rows


def run_bench(cfg: BenchConfig) -> list[dict]:
    """Run every unfinished cell of the grid, then write the reports. Returns all result rows.

    OUT is claimed for the whole run (`claim_output_dir`): a second bench on it is refused. A bad
    option fails before any cell runs: the config checked itself when it was built, the grid is
    parsed first, and every cell's training and evaluation config is built up front."""
    from .io import claim_output_dir

    out = Path(cfg.out)
    cells = None if cfg.report_only else build_grid(parse_methods(cfg.methods), parse_budgets(cfg.budgets),
                                                    parse_seeds(cfg.seeds))
    with claim_output_dir(out, "qtune bench"):
        if cells is None:
            write_reports(out, cfg)
        else:
            _run_grid(cells, cfg, out)
    return read_results(out / RESULTS_FILE)


def _check_cell_configs(cells: list[Cell], settings: dict, out: Path) -> None:
    """Build every cell's TrainConfig and the evaluation config (building checks them), so that
    settings no cell can run with fail now, in one line, not in every cell after the first ones
    have trained."""
    for cell in cells:
        try:
            train_config(cell, settings, out / "cells" / cell.name / "train")
        except QTuneError as exc:
            raise QTuneError(f"cell {cell.name}: {exc}") from None
    eval_config(settings, out / "model", out / "eval")  # the same for every cell, but for these paths


def _run_grid(cells: list[Cell], cfg: BenchConfig, out: Path) -> None:
    """Run the cells that have no result yet, then write the reports; raise if any cell failed."""
    settings = resolve_settings(cfg)
    _check_cell_configs(cells, settings, out)
    _check_settings(out, settings)
    sync_results(out)
    metric = f"exact_match_{cfg.metric}"
    pending, done = [], 0
    for cell in cells:
        row = _finished(out, cell)
        if row is None:
            pending.append(cell)
        else:
            done += 1
            print(f"[{done}/{len(cells)}] {cell.label} ... done earlier: acc {100 * row[metric]:.1f}%", flush=True)
    progress = _Progress(out, done, len(cells), metric)
    if cfg.jobs == 1:
        for cell in pending:
            print(progress.start(cell), end=" ", flush=True)
            print(progress.finish(cell, *_run_cell_reporting_errors(cell, settings, str(out), cfg.keep_models)),
                  flush=True)
    elif pending:
        _run_parallel(pending, settings, out, cfg, progress)
    write_reports(out, cfg)
    if progress.failures:
        raise QTuneError(f"{len(progress.failures)} cell(s) failed: {', '.join(progress.failures)}; see their "
                         "cell.log, then run the same command again to retry them")


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
        with open(self.out / RESULTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return f"acc {100 * row[self.metric]:.1f}% in {row['cell_seconds']:.0f} s"


def _cpu_count() -> int:
    """CPUs this process may run on (a container may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_parallel(pending: list[Cell], settings: dict, out: Path, cfg: BenchConfig, progress: _Progress) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, _cpu_count() // cfg.jobs)
    # spawn, not fork: the parent has torch loaded, and forking its thread pools is unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(cfg.jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_cell_reporting_errors, cell, settings, str(out), cfg.keep_models): cell
                   for cell in pending}
        try:
            for future in as_completed(futures):
                cell = futures[future]
                line = progress.start(cell)
                print(line, progress.finish(cell, *future.result()), flush=True)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        except BrokenProcessPool:
            raise QTuneError("a cell's process died without a Python error (out of memory? killed?); the cells "
                             "that finished are kept: run the same command again, perhaps with fewer --jobs") from None


# --------------------------------------------------------------------------------------------- tables


#: Columns aggregated over seeds: (row key, table header, scale, decimals).
COLUMNS = (
    ("exact_match_strict", "strict EM %", 100, 1),
    ("exact_match_flexible", "flexible EM %", 100, 1),
    ("perplexity", "PPL", 1, 2),
    ("loss_tokens", "loss tokens", 1, 0),
    ("loss_token_fraction", "loss tokens %", 100, 1),
    ("kept_sample_fraction", "kept samples %", 100, 1),
    ("scoring_seconds", "scoring s", 1, 1),
    ("training_seconds", "training s", 1, 1),
    ("wall_seconds", "wall s", 1, 1),
)


@dataclass
class GroupStats:
    """The result rows of one (method, r_sample, r_token) over its seeds."""

    method: str
    r_sample: float
    r_token: float
    nominal_budget: float
    seeds: list[int]
    mean: dict[str, float | None]
    std: dict[str, float | None]  # sample standard deviation; None with a single seed
    best: bool = False  # highest mean of the ranking metric among the methods of its budget

    @property
    def budget_label(self) -> str:
        return "full data" if self.method == FULL else f"{self.r_sample:g}x{self.r_token:g}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize_results(rows: list[dict], metric: str = "exact_match_strict") -> list[GroupStats]:
    """Mean and standard deviation over seeds per (method, r_sample, r_token), `full` first, then
    budgets from the largest down; `best` marks, in each budget run by two or more methods, the
    method(s) with the highest mean `metric`."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["r_sample"], row["r_token"]), []).append(row)
    stats = []
    for (method, r_sample, r_token), members in groups.items():
        members.sort(key=lambda r: r["seed"])
        mean, std = {}, {}
        for key, *_ in COLUMNS:
            mean[key], std[key] = _mean_std([r[key] for r in members if r.get(key) is not None])
        stats.append(GroupStats(method, r_sample, r_token, members[0]["nominal_budget"],
                                [r["seed"] for r in members], mean, std))
    stats.sort(key=lambda g: (g.method != FULL, -g.nominal_budget, -g.r_sample, g.method))
    for key in {(g.r_sample, g.r_token) for g in stats if g.method != FULL}:
        rivals = [g for g in stats if g.method != FULL and (g.r_sample, g.r_token) == key and g.mean[metric] is not None]
        if len(rivals) > 1:
            top = max(g.mean[metric] for g in rivals)
            for g in rivals:
                g.best = g.mean[metric] >= top - 1e-12
    return stats


def _format_stat(mean: float | None, std: float | None, scale: float, decimals: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean * scale:.{decimals}f}"
    return text if std is None else f"{text} ± {std * scale:.{decimals}f}"


def results_table(stats: list[GroupStats], metric: str) -> tuple[list[str], list[list[str]], set[tuple[int, int]]]:
    """Headers, formatted rows and the (row, column) cells to emphasise (best of its budget)."""
    headers = ["method", "budget", "r_sample x r_token", "seeds"] + [h for _, h, *_ in COLUMNS]
    metric_column = 4 + [k for k, *_ in COLUMNS].index(metric)
    rows, bold = [], set()
    for i, g in enumerate(stats):
        rows.append([g.method, f"{g.nominal_budget:.4g}", g.budget_label, str(len(g.seeds))]
                    + [_format_stat(g.mean[k], g.std[k], scale, d) for k, _, scale, d in COLUMNS])
        if g.best:
            bold.add((i, metric_column))
    return headers, rows, bold


def markdown_results(stats: list[GroupStats], metric: str) -> str:
    from .report import format_table

    headers, rows, bold = results_table(stats, metric)
    rows = [[f"**{c}**" if (i, j) in bold else c for j, c in enumerate(row)] for i, row in enumerate(rows)]
    return format_table(headers, rows)


def csv_results(stats: list[GroupStats]) -> str:
    """One line per (method, budget): means, standard deviations (empty with one seed), best flag."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "r_sample", "r_token", "nominal_budget", "seeds", "best"]
                    + [f"{k}_{s}" for k, *_ in COLUMNS for s in ("mean", "std")])
    for g in stats:
        values = []
        for key, *_ in COLUMNS:
            values += ["" if g.mean[key] is None else repr(g.mean[key]), "" if g.std[key] is None else repr(g.std[key])]
        writer.writerow([g.method, g.r_sample, g.r_token, g.nominal_budget, " ".join(map(str, g.seeds)),
                         int(g.best)] + values)
    return buffer.getvalue()


def audit_rows(rows: list[dict], stats: list[GroupStats], text=str) -> tuple[list[str], list[list[str]]] | None:
    """Per (method, budget): the share of each category's sample appearances that were not trained
    on, averaged over seeds. None when the training data has no categories. The category names
    come from the data: `text` writes them into the headers (`markdown_text` for Markdown)."""
    audited = [r for r in rows if r.get("audit")]
    if not audited:
        return None
    categories = sorted({c for r in audited for c in r["audit"]})
    table = []
    for g in stats:
        members = [r for r in audited if (r["method"], r["r_sample"], r["r_token"]) == (g.method, g.r_sample, g.r_token)]
        if not members:
            continue
        cells = []
        for cat in categories:
            mean, std = _mean_std([r["audit"][cat]["dropped_share"] for r in members if cat in r["audit"]])
            cells.append(_format_stat(mean, std, 100, 1))
        table.append([g.method, g.budget_label] + cells)
    return ["method", "r_sample x r_token"] + [f"dropped {text(c)} %" for c in categories], table


#: The baseline every other pruning method is compared with at its own budget.
RANDOM = "random"

COMPARISON_NOTE = (
    "Difference of mean accuracy in percentage points, and the same difference in units of the pooled "
    "standard deviation sqrt((s1^2 + s2^2) / 2) of the two groups over seeds. Verdict: win or loss when the "
    "difference exceeds one pooled standard deviation, tie otherwise (a reading aid with few seeds, not a "
    "significance test). Wall = mean wall time (scoring + training) relative to full data.")


def _versus(g: GroupStats, other: GroupStats | None, metric: str) -> list[str]:
    """Δ (pp), Δ in pooled standard deviations and the verdict of `g` against `other`."""
    if other is None or g.mean[metric] is None or other.mean[metric] is None:
        return ["-", "-", "-"]
    delta = 100 * (g.mean[metric] - other.mean[metric])
    if g.std[metric] is None or other.std[metric] is None:
        return [f"{delta:+.1f}", "-", "one seed"]
    pooled = 100 * math.sqrt((g.std[metric] ** 2 + other.std[metric] ** 2) / 2)
    verdict = "tie" if abs(delta) <= pooled else ("win" if delta > 0 else "loss")
    return [f"{delta:+.1f}", f"{delta / pooled:+.2f}" if pooled else "-", verdict]


def comparison_rows(stats: list[GroupStats], metric: str) -> tuple[list[str], list[list[str]]] | None:
    """Every pruned (method, budget) against random pruning at the same budget and against full
    data: accuracy difference, in pooled standard deviations, verdict; and the wall-time ratio.
    None when only full data was run."""
    full = next((g for g in stats if g.method == FULL), None)
    randoms = {(g.r_sample, g.r_token): g for g in stats if g.method == RANDOM}
    table = []
    for g in stats:
        if g.method == FULL:
            continue
        baseline = randoms.get((g.r_sample, g.r_token)) if g.method != RANDOM else None
        wall = ("-" if full is None or not full.mean["wall_seconds"] or g.mean["wall_seconds"] is None
                else f"{g.mean['wall_seconds'] / full.mean['wall_seconds']:.2f}x")
        table.append([g.method, g.budget_label] + _versus(g, baseline, metric) + _versus(g, full, metric) + [wall])
    if not table:
        return None
    return (["method", "r_sample x r_token", "vs random (pp)", "in std", "verdict", "vs full (pp)", "in std",
             "verdict", "wall vs full"], table)


# --------------------------------------------------------------------------------------------- reports


def write_reports(out: Path, cfg: BenchConfig) -> dict[str, Path]:
    """results.md, results.csv, plots/*.png and report.html from OUT/results.jsonl."""
    from .io import write_text
    from .report import format_table, markdown_text

    settings = load_settings(out)
    rows = read_results(out / RESULTS_FILE)
    if not rows:
        raise QTuneError(f"{out / RESULTS_FILE}: no finished cell to report on")
    metric = f"exact_match_{cfg.metric}"
    stats = summarize_results(rows, metric)
    written = {}
    markdown = "# Benchmark results\n\n" + markdown_results(stats, metric) + "\n"
    comparison = comparison_rows(stats, metric)
    if comparison is not None:
        markdown += "\n## Wins, ties and losses\n\n" + COMPARISON_NOTE + "\n\n" + format_table(*comparison) + "\n"
    audit = audit_rows(rows, stats)  # for the HTML report, which escapes every text itself
    if audit is not None:
        markdown += ("\n## Pruning audit (dropped share per category)\n\n"
                     + format_table(*audit_rows(rows, stats, markdown_text)) + "\n")
    written["markdown"] = out / "results.md"
    write_text(written["markdown"], markdown)
    written["csv"] = out / "results.csv"
    write_text(written["csv"], csv_results(stats))
    plots, examples, eu_note = {}, [], ""
    if cfg.plots:
        plots = _draw_result_plots(out / "plots", stats, metric)
        try:
            base = base_model_scores(out, settings)
        except QTuneError as exc:  # e.g. the base model is gone: the other reports are still worth having
            print(f"warning: no EU-plane figures nor token examples: {exc}", file=sys.stderr, flush=True)
            base = None
        if base is not None:
            plots.update(_draw_eu_planes(out, rows, base, settings))
            eu_note = base["note"]
            if cfg.examples:
                examples = token_examples(base, settings, rows, cfg.examples)
    written.update(plots)
    written["html"] = out / "report.html"
    _write_html(written["html"], settings, rows, stats, metric, comparison, audit, plots, examples, eu_note)
    print(f"reports: {out / 'results.md'}, {out / 'results.csv'}, {out / 'report.html'}", flush=True)
    return written


def _draw_result_plots(folder: Path, stats: list[GroupStats], metric: str) -> dict[str, Path]:
    from .plotting import plot_accuracy_vs_budget, plot_accuracy_vs_time

    label = f"{metric.replace('exact_match_', '')} exact match (%)"
    series: dict[str, list] = {}
    timing: dict[str, list] = {}
    full = None
    for g in stats:
        acc = (100 * g.mean[metric], None if g.std[metric] is None else 100 * g.std[metric])
        if g.method == FULL:
            full = acc
        else:
            series.setdefault(g.method, []).append((g.nominal_budget, *acc))
        timing.setdefault(g.method, []).append((g.mean["wall_seconds"], g.std["wall_seconds"], *acc,
                                                g.budget_label))
    return {
        "accuracy_vs_budget": plot_accuracy_vs_budget(folder / "accuracy_vs_budget.png", series, full, ylabel=label),
        "accuracy_vs_time": plot_accuracy_vs_time(folder / "accuracy_vs_time.png", timing, ylabel=label),
    }


def base_model_scores(out: Path, settings: dict) -> dict:
    """PPL, entropy and per-token NLL of every training sample under the BASE model, cached in
    OUT/base_scores.json (rebuilt when model or data settings change).

    Returns {"sample_id", "ppl", "ent", "token_nll", "category", "note"} (lists in sample order).
    """
    from .io import write_text

    key = {k: settings[k] for k in ("model", "data", "format", "limit", "max_length", "dtype")}
    path = out / "base_scores.json"
    if path.exists():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached
    from .data import load_records, record_id_of, require_pad_token, tokenize_records
    from .models import load_model, load_tokenizer
    from .scoring import score_dataset

    tokenizer = load_tokenizer(settings["model"], trust_remote_code=settings["trust_remote_code"],
                               pad_token=settings["pad_token"])
    records, _ = load_records(settings["data"], settings["format"], limit=settings["limit"])
    samples, _ = tokenize_records(records, tokenizer, max_length=settings["max_length"])
    model = load_model(settings["model"], dtype=settings["dtype"], device=settings["device"],
                       trust_remote_code=settings["trust_remote_code"])
    print(f"scoring {len(samples)} training samples with the base model for the report", flush=True)
    scores = score_dataset(model, samples, pad_token_id=require_pad_token(tokenizer),
                           batch_size=settings["batch_size"], per_token=True, chunk_tokens=settings["chunk_tokens"],
                           progress=False)
    meta = {r.sample_id: r.metadata for r in records}
    has_categories = any("category" in m for m in meta.values())
    result = {
        "key": key,
        "sample_id": scores.sample_id,
        "ppl": scores.ppl,
        "ent": scores.ent,
        "token_nll": scores.token_nll,
        "category": ([str(meta[record_id_of(s)].get("category", "none")) for s in scores.sample_id]
                     if has_categories else None),
        "note": (f"Positions: PPL and entropy of each training sample under the base model {settings['model']} "
                 "(before any training). Colour: the share of the run's steps that showed the sample in which "
                 "the method trained on it (from its steps.jsonl). Methods that score during training "
                 "(qtuning) decided with the weights of the moment and the quantiles of each batch, so the "
                 "picture is blurred near quadrant boundaries; no threshold lines are drawn because every "
                 "batch had its own."),
    }
    write_text(path, json.dumps(result))
    return result


def kept_share(steps_path: Path, sample_ids: list[int]) -> list[float | None]:
    """Per sample: kept / seen over the run's steps, None for samples no step showed."""
    from collections import Counter

    seen, kept = Counter(), Counter()
    for step in _read_jsonl(steps_path):
        seen.update(step["sample_ids"])
        kept.update(step["kept_ids"])
    return [kept[s] / seen[s] if seen[s] else None for s in sample_ids]


def _draw_eu_planes(out: Path, rows: list[dict], base: dict, settings: dict) -> dict[str, Path]:
    """One figure per pruning method, one panel per budget, from the lowest seed that has its steps."""
    from .plotting import plot_kept_eu_plane

    figures = {}
    methods = sorted({r["method"] for r in rows if r["method"] != FULL})
    for method in methods:
        panels = []
        budgets = sorted({(r["r_sample"], r["r_token"]) for r in rows if r["method"] == method}, reverse=True)
        for r_sample, r_token in budgets:
            runs = sorted((r for r in rows if (r["method"], r["r_sample"], r["r_token"]) == (method, r_sample, r_token)),
                          key=lambda r: r["seed"])
            for run in runs:
                steps = out / "cells" / run["cell"] / "train" / "steps.jsonl"
                if steps.exists():
                    panels.append((f"r_sample={r_sample:g}, r_token={r_token:g} (seed {run['seed']})",
                                   kept_share(steps, base["sample_id"])))
                    break
        if panels:
            figures[f"eu_plane_{method}"] = plot_kept_eu_plane(
                out / "plots" / f"eu_plane_{method}.png", base["ppl"], base["ent"], panels,
                categories=base["category"], title=f"{method}: what was trained on, on the base model's EU plane")
    return figures


def _example_budget(rows: list[dict]) -> tuple[float, float]:
    budgets = sorted({(r["r_sample"], r["r_token"]) for r in rows if r["method"] != FULL})
    if not budgets or EXAMPLE_BUDGET in budgets:
        return EXAMPLE_BUDGET
    return budgets[len(budgets) // 2]


def token_examples(base: dict, settings: dict, rows: list[dict], count: int):
    """Q2 samples of the whole training set (triaged at once with the base model's scores) with the
    response tokens that Stage 2 would prune at the example budget, one per category in turn."""
    import torch

    from .data import load_records, record_id_of, tokenize_records
    from .html_report import TokenExample
    from .models import load_tokenizer
    from .pruning import prune_tokens, token_perplexity, triage

    r_sample, r_token = _example_budget(rows)
    decision = triage(torch.tensor(base["ppl"]), torch.tensor(base["ent"]), r_sample)
    q2 = decision.prune_tokens.nonzero().flatten().tolist()
    categories = base["category"] or ["all"] * len(base["sample_id"])
    queues: dict[str, list[int]] = {}
    for i in q2:
        queues.setdefault(categories[i], []).append(i)
    chosen = []
    while len(chosen) < count and any(queues.values()):
        for cat in sorted(queues):
            if queues[cat] and len(chosen) < count:
                chosen.append(queues[cat].pop(0))
    if not chosen:
        return []
    tokenizer = load_tokenizer(settings["model"], trust_remote_code=settings["trust_remote_code"],
                               pad_token=settings["pad_token"])
    records, _ = load_records(settings["data"], settings["format"], limit=settings["limit"])
    by_id = {r.sample_id: r for r in records}
    wanted = [by_id[record_id_of(base["sample_id"][i])] for i in chosen]
    samples = {s["sample_id"]: s for s in tokenize_records(wanted, tokenizer, max_length=settings["max_length"])[0]}
    examples = []
    for i in chosen:
        sid = base["sample_id"][i]
        sample, nll = samples[sid], torch.tensor(base["token_nll"][i])
        tokppl = token_perplexity(nll)[None]
        mask = prune_tokens(tokppl, torch.ones_like(tokppl, dtype=torch.bool), r_token, lam=settings["lam"],
                            neighbor=settings["neighbor"], edge=settings["edge"])[0].tolist()
        positions = [t for t, label in enumerate(sample["labels"]) if t > 0 and label != -100]
        pieces = _token_texts(tokenizer, sample["input_ids"], positions)
        prompt = "\n".join(m["content"] for m in by_id[record_id_of(sid)].messages if m["role"] != "assistant")
        examples.append(TokenExample(
            sample_id=sid, category=categories[i], prompt=prompt,
            tokens=[(text, keep, float(p)) for text, keep, p in zip(pieces, mask, tokppl[0].tolist())],
            ppl=base["ppl"][i], ent=base["ent"][i], r_sample=r_sample, r_token=r_token,
        ))
    return examples


def _token_texts(tokenizer, input_ids: list[int], positions: list[int]) -> list[str]:
    """The text each response token adds, decoded as differences of growing prefixes of its span,
    so that characters split over several byte-level tokens come out whole; a token that ends a
    span, or that is not contiguous with the previous one, starts a new span."""
    texts = []
    span_start = None
    previous_text = ""
    for k, t in enumerate(positions):
        if k == 0 or t != positions[k - 1] + 1:
            span_start, previous_text = t, ""
        text = tokenizer.decode(input_ids[span_start : t + 1], skip_special_tokens=False)
        texts.append(text[len(previous_text):] if text.startswith(previous_text) else
                     tokenizer.decode([input_ids[t]], skip_special_tokens=False))
        previous_text = text
    return texts


def _write_html(path: Path, settings: dict, rows: list[dict], stats: list[GroupStats], metric: str,
                comparison, audit, plots: dict[str, Path], examples, eu_note: str) -> None:
    from . import html_report as H

    headers, table_rows, bold = results_table(stats, metric)
    metric_name = metric.replace("exact_match_", "")
    sections = [
        H.section("Setup", H.table(["option", "value"], [[k, str(v)] for k, v in sorted(settings.items())]),
                  H.paragraph(f"{len(rows)} finished cells. Ranking metric: {metric_name} exact match.")),
        H.section("Results", H.paragraph(
            "Mean ± sample standard deviation over seeds. Bold: the best method of its budget (highest mean "
            f"{metric_name} exact match, among two or more methods). Budget = r_sample x r_token, the nominal share "
            "of response tokens trained on; loss tokens % is the measured share. Wall time = scoring + training "
            "(evaluation excluded)."), H.table(headers, table_rows, bold=bold)),
    ]
    if comparison is not None:
        sections.append(H.section("Wins, ties and losses", H.paragraph(COMPARISON_NOTE), H.table(*comparison)))
    figures = [H.image(plots[name], caption) for name, caption in (
        ("accuracy_vs_budget", "Accuracy against the nominal budget (log scale); error bars: standard deviation "
                               "over seeds; dashed line: full data."),
        ("accuracy_vs_time", "Accuracy against wall time (scoring + training) per run."),
    ) if name in plots]
    if figures:
        sections.append(H.section("Plots", *figures))
    if audit is not None:
        sections.append(H.section("Pruning audit", H.paragraph(
            "Share of each ground-truth category's appearances in training steps that were not trained on "
            "(random pruning drops every category alike, about 1 - r_sample)."), H.table(*audit)))
    eu = [H.image(p, name.removeprefix("eu_plane_")) for name, p in plots.items() if name.startswith("eu_plane_")]
    if eu:
        sections.append(H.section("What each method kept, on the EU plane", H.paragraph(eu_note), *eu))
    if examples:
        sections.append(H.section("Token pruning examples", H.paragraph(
            f"Q2 samples of the whole training set triaged at once with the base model's scores at "
            f"r_sample={examples[0].r_sample:g}; struck-through tokens are those Stage 2 prunes at "
            f"r_token={examples[0].r_token:g} (per-sample budget, base model's token perplexities). During "
            "training the same happens per batch, with the current weights."),
            *[H.token_example(e) for e in examples]))
    H.write_report(path, "qtune benchmark report", sections)


# --------------------------------------------------------------------------------------------- CLI


def _bench(ns: argparse.Namespace) -> None:
    run_bench(build_config(BenchConfig, ns, ns.config))


def add_bench_parser(commands) -> argparse.ArgumentParser:
    """Add `qtune bench` to the subparsers object of the `qtune` parser."""
    bench = commands.add_parser(
        "bench", help="Benchmark grid: methods x budgets x seeds, with tables, plots and an HTML report.",
        description="Train and evaluate every method at every budget r_sample x r_token (full data once per "
                    "seed) on the testbed or on --model/--data/--eval-data; resumable; writes results.md, "
                    "results.csv, plots/ and report.html into --out. Options can also come from a YAML file "
                    "(--config); flags override it.")
    bench.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    add_arguments(bench, BenchConfig)
    bench.set_defaults(func=_bench)
    return bench


"""`qtune bench`: the benchmark grid of methods x budgets x seeds, and its reports. See docs/bench.md.

This package's front: `run_bench` and the command's parser. The work is split by job:

- `grid`: the options (`BenchConfig`) and the cells of the grid;
- `results`: what a run keeps in OUT (its settings, one result row per finished cell);
- `cells`: training and evaluating the cells, one at a time or in worker processes;
- `stats`: means and standard deviations over seeds, comparisons, audit, tables;
- `reports`: results.md, results.csv, plots/ and report.html.

Their top level imports nothing heavy, so that `qtune --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import add_arguments, build_config
from ..contamination import check_contamination
from ..errors import QTuneError
from ..io import claim_output_dir
from .cells import run_cell, run_cells
from .grid import (BUDGET_FREE, DEFAULT_BUDGETS, FULL, MATCHED, TESTBED_PRESETS, BenchConfig, Cell, build_grid,
                   parse_budgets, parse_methods, parse_seeds, preset_defaults)
from .reports import write_reports
from .results import RESULTS_FILE, read_results, resolve_settings
from .stats import GroupStats, comparison_rows, csv_results, markdown_results, summarize_results

__all__ = [
    "BUDGET_FREE",
    "DEFAULT_BUDGETS",
    "FULL",
    "MATCHED",
    "TESTBED_PRESETS",
    "BenchConfig",
    "Cell",
    "GroupStats",
    "add_bench_parser",
    "build_grid",
    "comparison_rows",
    "csv_results",
    "markdown_results",
    "parse_budgets",
    "parse_methods",
    "parse_seeds",
    "read_results",
    "run_bench",
    "run_cell",
    "summarize_results",
    "preset_defaults",
    "write_reports",
]


def run_bench(cfg: BenchConfig) -> list[dict]:
    """Run every unfinished cell of the grid, then write the reports. Returns all result rows.

    OUT is claimed for the whole run (`claim_output_dir`): a second bench on it is refused. A bad
    option fails before any cell runs: the config checked itself when it was built, the grid is
    parsed first, and every cell's training and evaluation config is built up front. On user data
    (--data or --eval-data given) the training data is checked against the evaluation data first
    (`qtune.contamination.check_contamination`): too much overlap stops the run before OUT is touched."""
    out = Path(cfg.out)
    cells = None
    if not cfg.report_only:
        methods = parse_methods(cfg.methods)
        if cfg.keep_models_of is not None and cfg.keep_models_of not in methods:
            raise QTuneError(f"--keep-models-of: {cfg.keep_models_of} is not among the methods run "
                             f"({', '.join(methods)})")
        data_seeds = parse_seeds(cfg.data_seeds, "--data-seeds")
        if min(data_seeds) < 0:
            raise QTuneError(f"--data-seeds: a draw of the data is a non-negative integer, not {min(data_seeds)}")
        if data_seeds != [0] and (cfg.data is not None or cfg.eval_data is not None):
            raise QTuneError("--data-seeds draws the testbed's data again; with --data or --eval-data there is "
                             "only your data: leave --data-seeds at 0")
        cells = build_grid(methods, parse_budgets(cfg.budgets), parse_seeds(cfg.seeds), data_seeds)
    if cells is not None and (cfg.data is not None or cfg.eval_data is not None):
        # On user data, before anything is written; the testbed's splits share templates by construction.
        settings = resolve_settings(cfg)
        check_contamination(settings["data"], settings["eval_data"], threshold=cfg.contamination_threshold,
                            allow=cfg.allow_contamination, command="qtune bench", format=settings["format"])
    with claim_output_dir(out, "qtune bench"):
        failures = [] if cells is None else run_cells(cells, cfg, out)
        write_reports(out, cfg)
        if failures:
            raise QTuneError(f"{len(failures)} cell(s) failed: {', '.join(failures)}; see their cell.log, then run "
                             "the same command again to retry them")
    return read_results(out / RESULTS_FILE)


def _bench(ns: argparse.Namespace) -> None:
    run_bench(build_config(BenchConfig, ns, ns.config, given_defaults=preset_defaults))


def add_bench_parser(commands) -> argparse.ArgumentParser:
    """Add `qtune bench` to the subparsers object of the `qtune` parser."""
    bench = commands.add_parser(
        "bench", help="Benchmark grid: methods x budgets x seeds, with tables, plots and an HTML report.",
        description="Train and evaluate every method at every budget r_sample x r_token (full data and oracle "
                    "once per seed) on the testbed (--testbed) or on --model/--data/--eval-data; resumable; "
                    "writes results.md, "
                    "results.csv, plots/ and report.html into --out. Options can also come from a YAML file "
                    "(--config); flags override it. With --testbed (flag or YAML), the preset's calibrated "
                    "settings are the defaults of the options not given.")
    bench.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    add_arguments(bench, BenchConfig)
    bench.set_defaults(func=_bench)
    return bench

"""What a bench run keeps in its OUT folder: bench.json, the settings its cells were made with, and
results.jsonl, one row per finished cell (each also in its cell's result.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import QTuneError
from ..io import read_jsonl, write_json, write_jsonl
from .grid import BenchConfig, Cell

#: Options that choose which cells run and how results are reported: changing them between two runs
#: into the same OUT does not change any cell's result. Every other option does.
NOT_RESULT_OPTIONS = frozenset({"out", "methods", "budgets", "seeds", "data_seeds", "jobs", "report_only", "metric",
                                "examples", "plots", "keep_models", "keep_models_of", "contamination_threshold",
                                "allow_contamination"})
SETTINGS_FILE = "bench.json"
RESULTS_FILE = "results.jsonl"


def _resolve_path(path: str) -> str:
    """Absolute path for local files and folders; a hub id stays as it is."""
    return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


def resolve_settings(cfg: BenchConfig, data_seed: int = 0) -> dict:
    """Every option that determines a cell's result, with model and data resolved: the model and
    data of the `testbed` preset stand in for any not given, from its draw `data_seed` of the data
    (0: the preset's own, whose settings bench.json keeps; the draw is built on first use)."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_RESULT_OPTIONS}
    if None in (cfg.model, cfg.data, cfg.eval_data):
        from ..testbed import build_testbed

        paths = build_testbed(preset=cfg.testbed, data_seed=data_seed)
        defaults = {"model": paths.model_dir, "data": paths.train_path, "eval_data": paths.test_path}
        settings.update({k: str(v) for k, v in defaults.items() if settings[k] is None})
    for key in ("model", "data", "eval_data", "reference_model"):
        if settings[key] is not None:
            settings[key] = _resolve_path(settings[key])
    return settings


#: How a bench run made before an option existed behaved, where that differs from the option's
#: default today: `testbed` was added when the data-starved preset was the only one, and its
#: default became "saturated" later.
OPTIONS_BEFORE_THEY_EXISTED = {"testbed": "data-starved"}


def check_settings(out: Path, settings: dict) -> None:
    """A second run into the same OUT must use the settings its finished cells were made with."""
    path = out / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        # An option added to qtune after that run was made behaved as its default there, or as it
        # did before its default changed (OPTIONS_BEFORE_THEY_EXISTED).
        defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
        old = {**{k: defaults.get(k) for k in settings}, **OPTIONS_BEFORE_THEY_EXISTED, **old}
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


def read_results(path: str | Path) -> list[dict]:
    """Rows of results.jsonl, the last row of each cell winning."""
    return list({row["cell"]: row for row in read_jsonl(Path(path))}.values())


def cell_folder(out: str | Path, cell: Cell) -> Path:
    """OUT/cells/<cell>: the cell's log, train/ and eval/ folders and result.json."""
    return Path(out) / "cells" / cell.name


def finished_row(out: Path, cell: Cell) -> dict | None:
    """The row of a cell that has finished in OUT, None for a cell that has not."""
    path = cell_folder(out, cell) / "result.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def sync_results(out: Path) -> list[dict]:
    """Rewrite results.jsonl from the cells on disk: a cell folder with result.json gives its row, a
    folder without one (a cell that did not finish) gives none, and rows of cells whose folder is
    gone are kept."""
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


def append_result(out: Path, row: dict) -> None:
    """Add a finished cell's row to results.jsonl."""
    with open(out / RESULTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")

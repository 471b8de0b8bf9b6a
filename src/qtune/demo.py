"""`qtune demo`: the embedded default run on the micro testbed, built from `qtune score` and
`qtune bench`."""

from __future__ import annotations

import os
from pathlib import Path

from .bench import BenchConfig, Cell, parse_budgets, run_bench
from .bench.reports import terminal_summary
from .bench.results import cell_folder
from .config import ScoreConfig
from .console import log
from .testbed import SFT_SETTINGS, build_testbed
from .workflows import run_score

#: What the demo compares at one budget (25% of each batch's samples x 50% of their tokens), one
#: seed: full data, random pruning, Q-Tuning, and the ground-truth ceiling at the same budget
#: (`oracle_ratio+random`: the batch's clean samples first, half of each one's tokens at random;
#: it reads the testbed's defect labels).
DEMO_METHODS = "full,random,qtuning,oracle_ratio+random"
DEMO_BUDGET = "0.25x0.5"
#: The method whose trained model the demo keeps (the others are deleted once evaluated), so that
#: `qtune eval` and `qtune score` have a model to run on right after it.
KEPT_METHOD = "qtuning"


def kept_model_dir(compare: str | Path) -> Path:
    """Where the demo's bench run (`compare`: its OUT) keeps the Q-Tuning model."""
    r_sample, r_token = parse_budgets(DEMO_BUDGET)[0]
    return cell_folder(compare, Cell(KEPT_METHOD, r_sample, r_token, 0)) / "train" / "model"


def _megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def closing_text(out: str | Path, test_path: str | Path) -> str:
    """What the demo prints at its end: the results (`terminal_summary`, tables at most 100
    characters wide), then where the report and the kept Q-Tuning model are, with its disk cost,
    and the commands to try next."""
    out = Path(out)
    compare = out / "compare"
    model = kept_model_dir(compare)
    if model.is_dir():
        kept = [f"  Q-Tuning model: {model}",
                f"                  ({_megabytes(model):.1f} MB on disk; the other models were not kept)"]
        try_it = ["next, the kept model on the testbed's held-out questions:",
                  f"  qtune eval --model {model} \\", f"      --data {test_path} --out {out / 'eval-qtuning'}"]
    else:  # its cell finished in an earlier demo that did not keep models
        kept = [f"  Q-Tuning model: not kept: its cell finished in an earlier run; delete {model.parent.parent}",
                "                  and run the demo again"]
        try_it = []
    return "\n".join([
        terminal_summary(compare),
        "",
        "demo done.",
        f"  report:         {compare / 'report.html'} (results.md beside it)",
        *kept,
        f"  EU plane:       {out / 'score-base' / 'eu_plane.png'}",
        *try_it,
        "then the same comparison on your own data (a causal LM; JSONL such as question/answer or messages):",
        "  qtune bench --model MODEL --data TRAIN.jsonl --eval-data TEST.jsonl --out runs/mine \\",
        f"      --methods full,random,qtuning --budgets {DEMO_BUDGET} --seeds 0,1,2 --keep-models-of {KEPT_METHOD}",
    ])


def run_demo(out: str | Path = "runs/demo") -> dict:
    """Build (or reuse) the default testbed, place its training set on the EU plane with the base
    model (per ground-truth category), then train `DEMO_METHODS` at `DEMO_BUDGET` (two cells at a
    time on a machine with two or more cores), evaluate each on the held-out set, write the
    comparison table, the pruning audit and the HTML report, and keep the Q-Tuning model."""
    out = Path(out)
    stages = 3
    log(f"[1/{stages}] testbed: building or reusing the tiny base model and its data")
    paths = build_testbed()
    log(f"      model {paths.model_dir}\n      train {paths.train_path}\n      test  {paths.test_path}")
    log(f"[2/{stages}] placing the training set on the EU plane with the base model")
    score = run_score(ScoreConfig(model=str(paths.model_dir), data=str(paths.train_path), out=str(out / "score-base"),
                                  batch_size=32))
    log(f"[3/{stages}] training {DEMO_METHODS.replace(',', ', ')} at {DEMO_BUDGET} (samples x tokens), then "
        "evaluating each")
    bench = BenchConfig(out=str(out / "compare"), methods=DEMO_METHODS, budgets=DEMO_BUDGET, seeds="0",
                        jobs=min(2, os.cpu_count() or 1), keep_models_of=KEPT_METHOD, **SFT_SETTINGS)
    rows = run_bench(bench)
    print("\n" + closing_text(out, paths.test_path), flush=True)
    return {"testbed": str(paths.root), "score": score, "results": rows, "model": str(kept_model_dir(out / "compare"))}

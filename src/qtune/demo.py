"""`qtune demo`: the embedded default run on the micro testbed, built from `qtune score` and
`qtune bench`."""

from __future__ import annotations

import os
from pathlib import Path

from .bench import BenchConfig, run_bench
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


def run_demo(out: str | Path = "runs/demo") -> dict:
    """Build (or reuse) the default testbed, place its training set on the EU plane with the base
    model (per ground-truth category), then train `DEMO_METHODS` at `DEMO_BUDGET` (two cells at a
    time on a machine with two or more cores), evaluate each on the held-out set and write the
    comparison table, the pruning audit and the HTML report."""
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
                        jobs=min(2, os.cpu_count() or 1), **SFT_SETTINGS)
    rows = run_bench(bench)
    print((out / "compare" / "results.md").read_text(encoding="utf-8"))
    log(f"demo done. EU plane: {out / 'score-base' / 'eu_plane.png'}; report: {out / 'compare' / 'report.html'}")
    return {"testbed": str(paths.root), "score": score, "results": rows}

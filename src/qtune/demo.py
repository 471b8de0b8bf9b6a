"""`qtune demo`: the embedded default run on the micro testbed, built from `qtune score` and
`qtune bench`."""

from __future__ import annotations

from pathlib import Path

from .bench import BenchConfig, run_bench
from .config import ScoreConfig
from .console import log
from .testbed import SFT_SETTINGS, build_testbed
from .workflows import run_score


def run_demo(out: str | Path = "runs/demo") -> dict:
    """Build (or reuse) the tiny base model and its data, place the training set on the EU plane
    with the base model (per ground-truth category), then train full data and Q-Tuning (25% samples
    x 70% tokens), evaluate both on the held-out set and write the comparison table and the HTML
    report."""
    out = Path(out)
    stages = 3
    log(f"[1/{stages}] testbed: building or reusing the tiny base model and its data")
    paths = build_testbed()
    log(f"      model {paths.model_dir}\n      train {paths.train_path}\n      test  {paths.test_path}")
    log(f"[2/{stages}] placing the training set on the EU plane with the base model")
    score = run_score(ScoreConfig(model=str(paths.model_dir), data=str(paths.train_path), out=str(out / "score-base"),
                                  batch_size=32))
    log(f"[3/{stages}] training full data and Q-Tuning (25% x 70%), then evaluating both")
    bench = BenchConfig(out=str(out / "compare"), methods="full,qtuning", budgets="0.25x0.7", seeds="0",
                        **SFT_SETTINGS)
    rows = run_bench(bench)
    print((out / "compare" / "results.md").read_text(encoding="utf-8"))
    log(f"demo done. EU plane: {out / 'score-base' / 'eu_plane.png'}; report: {out / 'compare' / 'report.html'}")
    return {"testbed": str(paths.root), "score": score, "results": rows}

"""The comparison of bench/below_bound.sh: each score source against the every-layer baseline.

    python bench/below_bound_report.py [OUT]     (default runs/below-bound)

For each source folder under OUT (a `qtune bench` run of qtuning at one budget): strict exact
match, mean +- std over seeds; the scoring phase's seconds and the wall seconds (scoring +
training); and the verdict of the criterion fixed before the runs: kept when its mean is >= the
baseline's mean minus the pooled standard deviation of the two.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BASELINE = "every-layer"


def rows(folder: Path) -> list[dict]:
    path = folder / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/below-bound")
    runs = {f.name: rows(f) for f in sorted(out.iterdir()) if f.is_dir()}
    base = runs.get(BASELINE, [])
    base_em = [100 * r["exact_match_strict"] for r in base]
    print("| source | seeds | strict EM % | score phase s | wall s | mean - baseline | pooled std | verdict |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in [BASELINE, *sorted(k for k in runs if k != BASELINE)]:
        results = runs.get(name, [])
        if not results:
            continue
        em = [100 * r["exact_match_strict"] for r in results]
        m, s = mean_std(em)
        score = statistics.fmean(r["phase_seconds"].get("score", 0.0) for r in results)
        wall = statistics.fmean(r["wall_seconds"] for r in results)
        if name == BASELINE or len(em) < 2 or len(base_em) < 2:
            diff = pooled = verdict = ""
        else:
            bm, bs = mean_std(base_em)
            pooled_std = ((s ** 2 + bs ** 2) / 2) ** 0.5
            diff, pooled = f"{m - bm:+.1f}", f"{pooled_std:.1f}"
            verdict = "keeps accuracy" if m >= bm - pooled_std else "loses accuracy"
        print(f"| {name} | {len(em)} | {m:.1f} ± {s:.1f} | {score:.0f} | {wall:.0f} | {diff} | {pooled} | {verdict} |")


if __name__ == "__main__":
    main()

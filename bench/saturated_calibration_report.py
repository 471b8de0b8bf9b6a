"""Judge the saturated preset's calibration criteria A1-A4 from the outputs of
bench/saturated_calibration.sh, and print them as Markdown (docs/testbed.md).

    python bench/saturated_calibration_report.py [OUT]   (default OUT: runs/saturated-calibration)

Reads OUT/a1.json and OUT/a2_early.json (bench/saturated_a1.py) and OUT/controls/results.jsonl
(qtune bench). Means and sample standard deviations are over seeds; "std" in a criterion is the
pooled standard deviation of the two groups compared, sqrt((s1^2 + s2^2) / 2), as the issue asks.
Missing outputs are reported as missing, never guessed.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def pooled(a: list[float], b: list[float]) -> float:
    return math.sqrt((mean_std(a)[1] ** 2 + mean_std(b)[1] ** 2) / 2)


def pct(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f} (n={len(values)})"


def verdict(ok: bool) -> str:
    return "**passes**" if ok else "**fails**"


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "runs/saturated-calibration")
    lines = []
    a1_path, early_path, controls_path = out / "a1.json", out / "a2_early.json", out / "controls" / "results.jsonl"
    if a1_path.exists():
        runs = json.loads(a1_path.read_text())["runs"]
        full = [r["test"] for r in runs if r["run"] == "full"]
        rand = [r["test"] for r in runs if r["run"] != "full"]
        epoch1 = statistics.fmean(r["dev_by_epoch"][0] for r in runs if r["run"] == "full")
        final = statistics.fmean(r["dev_by_epoch"][-1] for r in runs if r["run"] == "full")
        std = pooled(full, rand)
        lines += ["A1 (the defect-free version of the training set; test exact match, %):", "",
                  f"- full data {pct(full)}, random 25% {pct(rand)}; random - full = "
                  f"{100 * (statistics.fmean(rand) - statistics.fmean(full)):+.1f} points, pooled std {100 * std:.1f}: "
                  f"{verdict(statistics.fmean(rand) >= statistics.fmean(full) - std)} (>= full - 1 std)",
                  f"- full data's dev after epoch 1 / after the last: {100 * epoch1:.1f} / {100 * final:.1f} = "
                  f"{100 * epoch1 / final:.0f}%: {verdict(epoch1 >= 0.9 * final)} (>= 90%)", ""]
    else:
        lines += [f"A1: {a1_path} missing", ""]
    rows = [json.loads(line) for line in controls_path.read_text().splitlines()] if controls_path.exists() else []
    acc = {}
    for r in rows:
        acc.setdefault(r["method"], []).append(r["exact_match_strict"])
    if rows:
        lines += ["Controls (qtune bench, all training records; test exact match, %):", ""]
        lines += [f"- {m}: {pct(v)}" for m, v in acc.items()] + [""]
    early = None
    if early_path.exists():
        runs = json.loads(early_path.read_text())["runs"]
        early = [r["test_at_best_dev"] for r in runs if r["run"] == "full"]
        last = [r["test"] for r in runs if r["run"] == "full"]
        lines += [f"- full data, plain loop: at the epoch of the best dev score {pct(early)}, after the last epoch "
                  f"{pct(last)} (best dev epochs: {[r['best_dev_epoch'] for r in runs if r['run'] == 'full']})", ""]
    full, oracle = acc.get("full"), acc.get("oracle")
    if full and oracle:
        gap, std = statistics.fmean(oracle) - statistics.fmean(full), pooled(oracle, full)
        need = max(0.04, 3 * std)
        lines.append(f"A2: oracle - full = {100 * gap:+.1f} points, needs >= max(4, 3 x {100 * std:.1f}) = "
                     f"{100 * need:.1f}: {verdict(gap >= need)}")
        if early:
            gap, std = statistics.fmean(oracle) - statistics.fmean(early), pooled(oracle, early)
            lines.append(f"A2: oracle - best early-stopped full = {100 * gap:+.1f} points, needs >= 2 x {100 * std:.1f}"
                         f": {verdict(gap >= 2 * std)}")
    ratio, rand, anti = acc.get("oracle_ratio"), acc.get("random"), acc.get("anti_oracle")
    if ratio and full:
        gap = statistics.fmean(ratio) - statistics.fmean(full)
        lines.append(f"A3: oracle at 25% - full = {100 * gap:+.1f} points, needs >= 0: {verdict(gap >= 0)}")
    if ratio and rand:
        gap, std = statistics.fmean(ratio) - statistics.fmean(rand), pooled(ratio, rand)
        lines.append(f"A4: oracle at 25% - random at 25% = {100 * gap:+.1f} points, needs >= 3 x {100 * std:.1f}: "
                     f"{verdict(gap >= 3 * std)}")
    if rand and anti:
        gap, std = statistics.fmean(rand) - statistics.fmean(anti), pooled(rand, anti)
        lines.append(f"A4: random at 25% - anti-oracle at 25% = {100 * gap:+.1f} points, needs >= 3 x {100 * std:.1f}: "
                     f"{verdict(gap >= 3 * std)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Tables of bench/saturated_zoo.sh (Q-Tuning's ablations and the static selectors on the
saturated preset, planned in docs/bench.md), printed as Markdown.

    python bench/saturated_zoo_report.py [OUT [REFERENCE]]   (default OUT: runs/grid-saturated)

Reads REFERENCE (default OUT/b4/results.jsonl, part A of bench/saturated_grid.sh; the static rerun
of issue 30 reads runs/draws-saturated/results.jsonl: the full-data, random and Q-Tuning
reference rows at 25% x 50%, of the preset's own draw of the data, data seed 0, alone),
OUT/ablations/*/results.jsonl, and for each static selector
OUT/static/<selector>/select/ (the subset, summary.json) and OUT/static/<selector>/bench/results.jsonl.
A static selector's rows are named `select:<selector>`; its "dropped" audit is the share of each
category's training records that are not in its subset (the selection is made once, so every epoch
drops the same records). Missing outputs are reported as missing, never guessed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from qtune.io import read_jsonl
from qtune.bench.stats import audit_rows, data_seed, summarize_results, versus
from qtune.report import format_table, markdown_text
from qtune.testbed import build_testbed

BUDGET = (0.25, 0.5)
METRIC = "exact_match_strict"


def _pct(g, key: str = METRIC) -> str:
    mean, std = g.mean[key], g.std[key]
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _static_audit(train: list[dict], subset: list[dict]) -> dict:
    """Per category: the training set's records, the subset's, and the share not selected."""
    seen = Counter(r["metadata"]["category"] for r in train)
    kept = Counter(r["metadata"]["category"] for r in subset)
    return {c: {"seen": n, "kept": kept[c], "dropped_share": 1 - kept[c] / n} for c, n in seen.items()}


def main(argv: list[str]) -> None:
    out = Path(argv[0] if argv else "runs/grid-saturated")
    missing = []
    part_a = Path(argv[1]) if len(argv) > 1 else out / "b4" / "results.jsonl"
    reference = [r for r in read_jsonl(part_a)  # no file: no rows
                 if data_seed(r) == 0 and (r["method"] == "full" or (
                     r["method"] in ("random", "qtuning", "token_matched_random") and (r["r_sample"], r["r_token"]) == BUDGET))]
    if not reference:
        missing.append(str(part_a))
    ablations = []
    for path in sorted((out / "ablations").glob("*/results.jsonl")):
        switch = "--" + path.parent.name.replace("stages-", "stages ")
        ablations += [dict(r, method=f"qtuning {switch}") for r in read_jsonl(path)]
    train = read_jsonl(Path(build_testbed().root) / "train.jsonl")
    static, selection_seconds = [], {}
    for folder in sorted(f for f in (out / "static").glob("*") if f.is_dir()):
        results, subset = folder / "bench" / "results.jsonl", folder / "select" / "selected.jsonl"
        if not (results.exists() and subset.exists()):
            missing.append(str(folder))
            continue
        audit = _static_audit(train, read_jsonl(subset))
        summary = json.loads((folder / "select" / "summary.json").read_text())
        passes = summary.get("stats") or {}  # LESS and GrADS report their warm-up and gradients apart, RDS its passes
        selection_seconds[f"select:{folder.name}"] = summary["scoring_seconds"] + sum(
            passes.get(key, 0) for key in ("warmup_seconds", "gradient_seconds", "forward_seconds", "kde_seconds",
                                           "similarity_seconds"))
        # Labelled by the share of records selected (trained on whole: every token of the subset).
        static += [dict(r, method=f"select:{folder.name}", audit=audit, r_sample=summary["ratio"],
                        nominal_budget=summary["ratio"]) for r in read_jsonl(results)]

    stats = {(g.method, g.r_sample, g.r_token): g for g in summarize_results(reference + ablations + static)}
    full = stats.get(("full", 1.0, 1.0))
    random = stats.get(("random", *BUDGET))
    qtuning = stats.get(("qtuning", *BUDGET))
    lines = []
    if ablations:
        table = []
        for g in summarize_results(ablations):
            table.append([g.method, _pct(g), _pct(g, "loss_token_fraction"), f"{g.mean['wall_seconds']:.0f}"]
                         + versus(g, qtuning, METRIC) + versus(g, random, METRIC) + versus(g, full, METRIC))
        for g in (qtuning, random, full):
            if g is not None:
                table.append([f"{g.method} (part A)", _pct(g), _pct(g, "loss_token_fraction"),
                              f"{g.mean['wall_seconds']:.0f}"] + ["-"] * 9)
        lines += ["Q-Tuning's ablations at 25% x 50% (strict exact match %, mean ± std over seeds 0-2):", "",
                  format_table(["method", "strict EM %", "loss tokens %", "wall s", "vs qtuning (pp)", "in std",
                                "verdict", "vs random (pp)", "in std", "verdict", "vs full (pp)", "in std",
                                "verdict"], table), ""]
    if static:
        static_stats = summarize_results(static)
        baseline = next((g for g in static_stats if g.method == "select:random"), None)
        table = []
        for g in static_stats:
            seconds = selection_seconds.get(g.method)
            tokens = "-" if full is None else f"{100 * g.mean['loss_tokens'] / full.mean['loss_tokens']:.1f}"
            table.append([g.method, _pct(g), tokens,
                          "-" if seconds is None else f"{seconds:.0f}", f"{g.mean['training_seconds']:.0f}"]
                         + (["-"] * 3 if g is baseline else versus(g, baseline, METRIC))
                         + versus(g, full, METRIC) + versus(g, random, METRIC))
        lines += ["Static selectors: 25% of the records chosen once with the base model, trained on whole for 3 "
                  "epochs (strict exact match %, mean ± std over training seeds 0-2; loss tokens: share of full "
                  "data's; selection s: the one-off `qtune select`, its scoring passes and LESS's warm-up and "
                  "gradients):", "",
                  format_table(["selector", "strict EM %", "loss tokens %", "selection s", "training s",
                                "vs select:random (pp)", "in std", "verdict", "vs full (pp)", "in std", "verdict",
                                "vs dynamic random 25x50 (pp)", "in std", "verdict"], table), ""]
    audited = [r for r in ablations + static + reference if r.get("audit")]
    if audited:
        headers, table = audit_rows(audited, summarize_results(audited), markdown_text)
        lines += ["Share of each category's appearances not trained on (%):", "", format_table(headers, table), ""]
    if missing:
        lines += ["Missing (not run yet): " + ", ".join(missing), ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

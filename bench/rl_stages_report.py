"""The tables of bench/rl_stages.py, from its output folder.

    python bench/rl_stages_report.py [OUT]     (default runs/rl-stages)

1. Per start (full, qtuning, random): held-out strict exact match after SFT and after RL, mean ±
   standard deviation over the seeds that finished; the change RL made; wall seconds of each stage
   (SFT: scoring + training; RL: its steps) and the tokens each trained on (SFT: response tokens
   that received loss; RL: completion tokens, which receive the policy loss).
2. Gaps between starts: gap = EM(start) - EM(other), after SFT and after RL; per seed, the
   change of its size |gap after RL| - |gap after SFT|. Verdict: RL "closes" the gap when the
   mean change is below minus its standard deviation over seeds, "widens" it when above plus
   it, else "keeps" it (one seed has no standard deviation: no verdict).
3. The zero-variance pre-pass on the filtered start: accuracy after RL, the RL stage's seconds
   (steps + pre-pass), prompts trained on and dropped, zero-variance groups met in training.
4. SFT inside RL (--sft-in-rl): per start and variant, accuracy after RL against the plain GRPO
   stage from the same SFT models: the difference of means in points and in units of the pooled
   standard deviation of the two groups (win or loss beyond one, tie otherwise: docs/bench.md's
   criterion), the paired difference per seed, RL seconds, ReLIFT's SFT steps and records.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def stage_rows(folder: Path) -> dict[str, dict]:
    """The pipeline report's rows of one run folder, by stage ({} when it has none yet)."""
    path = folder / "report.json"
    return {r["stage"]: r for r in json.loads(path.read_text())["stages"]} if path.exists() else {}


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def finished(out: Path) -> dict[str, dict[int, dict]]:
    """start -> seed -> {"sft": row, "rl": row, "summary": RL summary} for runs whose RL stage was evaluated."""
    runs: dict[str, dict[int, dict]] = {}
    for seed_dir in sorted(out.glob("seed*")):
        seed = int(seed_dir.name.removeprefix("seed"))
        for run in sorted(p for p in seed_dir.iterdir() if p.is_dir()):
            rows = stage_rows(run)
            if "exact_match_strict" in rows.get("rl", {}):
                summary = json.loads((run / "rl" / "summary.json").read_text())
                runs.setdefault(run.name, {})[seed] = {**rows, "summary": summary}
    return runs


def is_start(name: str) -> bool:
    """Whether a run folder is a start's SFT -> RL pipeline; the others (`<start>-filtered`,
    `<start>-<variant>`) are rl-only stages from a start's SFT model."""
    return "-" not in name


def per_start_table(runs: dict) -> list[str]:
    lines = ["| start | seeds | EM after SFT % | EM after RL % | RL change pp | SFT s | RL s | SFT loss tokens | "
             "RL loss tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for start, seeds in runs.items():
        if not is_start(start):
            continue
        v = list(seeds.values())
        sft = [100 * r["sft"]["exact_match_strict"] for r in v]
        rl = [100 * r["rl"]["exact_match_strict"] for r in v]
        lines.append(f"| {start} | {len(v)} | {mean_std(sft)} | {mean_std(rl)} | "
                     f"{mean_std([b - a for a, b in zip(sft, rl)])} | {mean_std([r['sft']['seconds'] for r in v])} | "
                     f"{mean_std([r['rl']['seconds'] for r in v])} | "
                     f"{statistics.fmean(r['sft']['loss_tokens'] for r in v):,.0f} | "
                     f"{statistics.fmean(r['rl']['loss_tokens'] for r in v):,.0f} |")
    return lines


def verdict(changes: list[float]) -> str:
    if len(changes) < 2:
        return "needs two seeds or more"
    mean, sd = statistics.fmean(changes), statistics.stdev(changes)
    return "closes" if mean < -sd else "widens" if mean > sd else "keeps"


def gap_table(runs: dict) -> list[str]:
    lines = ["| gap | seeds | after SFT pp | after RL pp | change of size pp | RL ... the gap |",
             "|---|---:|---:|---:|---:|---|"]
    starts = [s for s in runs if is_start(s)]
    pairs = [(a, b) for a in starts for b in starts if a != b and (b == "full" or (a, b) == ("qtuning", "random"))]
    for a, b in pairs:
        seeds = sorted(set(runs[a]) & set(runs[b]))
        if not seeds:
            continue
        gap = {stage: [100 * (runs[a][s][stage]["exact_match_strict"] - runs[b][s][stage]["exact_match_strict"])
                       for s in seeds] for stage in ("sft", "rl")}
        changes = [abs(r) - abs(s) for s, r in zip(gap["sft"], gap["rl"])]
        lines.append(f"| {a} - {b} | {len(seeds)} | {mean_std(gap['sft'])} | {mean_std(gap['rl'])} | "
                     f"{mean_std(changes)} | {verdict(changes)} |")
    return lines


def filter_table(runs: dict) -> list[str]:
    lines = ["| start | RL stage | seeds | EM after RL % | RL s (of which pre-pass) | prompts trained (dropped) | "
             "zero-variance groups met in training |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, seeds in runs.items():
        if not name.endswith("-filtered") or name.removesuffix("-filtered") not in runs:
            continue
        start = name.removesuffix("-filtered")
        for label, source in (("all prompts", runs[start]), ("zero-variance prompts dropped", seeds)):
            v = [source[s] for s in sorted(seeds) if s in source]
            options = [r["summary"]["config"] for r in v]
            groups = [r["summary"]["steps"] * o["batch_size"] // o["num_generations"] for r, o in zip(v, options)]
            dropped = [(r["summary"]["zero_variance"] or {}).get("dropped", 0) for r in v]
            em = mean_std([100 * r["rl"]["exact_match_strict"] for r in v])
            pre_pass = mean_std([r["rl"]["filter_seconds"] for r in v])
            seconds = f"{mean_std([r['rl']['seconds'] for r in v])} ({pre_pass})"
            lines.append(f"| {start} | {label} | {len(v)} | {em} | {seconds} | "
                         f"{statistics.fmean(r['rl']['prompts'] for r in v):.0f} ({statistics.fmean(dropped):.0f}) | "
                         f"{statistics.fmean(r['summary']['zero_variance_groups'] for r in v):.0f} of "
                         f"{statistics.fmean(groups):.0f} |")
    return lines


def std_units(a: list[float], b: list[float]) -> str:
    """mean(a) - mean(b) in units of the pooled standard deviation sqrt((s_a^2 + s_b^2) / 2), with
    the verdict beyond one unit."""
    pooled = ((statistics.variance(a) + statistics.variance(b)) / 2) ** 0.5 if min(len(a), len(b)) > 1 else 0.0
    diff = statistics.fmean(a) - statistics.fmean(b)
    if pooled == 0:
        return f"{diff:+.1f}, no spread"
    units = diff / pooled
    return f"{diff:+.1f}, {units:+.1f}σ {'win' if units > 1 else 'loss' if units < -1 else 'tie'}"


def sft_in_rl_table(runs: dict) -> list[str]:
    lines = ["| start | RL stage | seeds | EM after RL % | vs GRPO (pooled std) | paired by seed pp | RL s | "
             "interleaved SFT steps (records) |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for name, seeds in runs.items():
        start, _, variant = name.partition("-")
        if not variant or variant == "filtered" or start not in runs:
            continue
        common = sorted(set(seeds) & set(runs[start]))
        grpo = [100 * runs[start][s]["rl"]["exact_match_strict"] for s in common]
        mixed = [100 * seeds[s]["rl"]["exact_match_strict"] for s in common]
        summaries = [seeds[s]["summary"] for s in common]
        lines.append(f"| {start} | {variant} | {len(common)} | {mean_std(mixed)} | {std_units(mixed, grpo)} | "
                     f"{mean_std([m - g for m, g in zip(mixed, grpo)])} | "
                     f"{mean_std([seeds[s]['rl']['seconds'] for s in common])} | "
                     f"{statistics.fmean(x['interleaved_sft_steps'] for x in summaries):.1f} "
                     f"({statistics.fmean(x['interleaved_sft_records'] for x in summaries):.0f}) |")
    return lines


def report(out: Path) -> str:
    runs = finished(Path(out))
    if not runs:
        return f"no finished run under {out}"
    tables = (per_start_table(runs), gap_table(runs), filter_table(runs), sft_in_rl_table(runs))
    return "\n\n".join("\n".join(t) for t in tables if len(t) > 2)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/rl-stages")))

"""The statistics of a bench run's result rows: mean and standard deviation over seeds per method
and budget, the comparison with random pruning and full data, the pruning audit per category, and
their tables (Markdown, CSV)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .grid import BUDGET_FREE, FULL, budget_label, is_control


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
    """The result rows of one (method, r_sample, r_token) over its seeds, pooled over the draws of
    the data when there are several (`data_seeds`; 0 for every row of a single draw)."""

    method: str
    r_sample: float
    r_token: float
    nominal_budget: float
    seeds: list[int]  # one per row: the training seed
    mean: dict[str, float | None]
    std: dict[str, float | None]  # sample standard deviation over every row; None with a single row
    best: bool = False  # highest mean of the ranking metric among the methods of its budget
    data_seeds: list[int] = field(default_factory=list)  # one per row: the draw of the data
    # Of the ranking metric, with two or more draws: the standard deviation of the draws' means
    # (what changes with the draw), and the root of the mean variance over training seeds within a
    # draw (what changes with the seed); None where a draw or a seed is single.
    draw_std: float | None = None
    seed_std: float | None = None

    @property
    def budget_label(self) -> str:
        return budget_label(self.method, self.r_sample, self.r_token)

    @property
    def runs_label(self) -> str:
        """How many rows the statistics pool: "3", or "3x3" for 3 draws x 3 training seeds."""
        draws = len(set(self.data_seeds))
        return str(len(self.seeds)) if draws < 2 else f"{draws}x{len(self.seeds) // draws}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def data_seed(row: dict) -> int:
    """The draw of the data a result row ran on (rows from before draws existed: 0)."""
    return row.get("data_seed", 0)


def draw_spread(members: list[dict], metric: str) -> tuple[float | None, float | None]:
    """(standard deviation of the per-draw means of `metric`, root of the mean within-draw
    variance over training seeds), each None when there are fewer than two draws, or for the
    second when no draw has two seeds."""
    by_draw: dict[int, list[float]] = {}
    for r in members:
        if r.get(metric) is not None:
            by_draw.setdefault(data_seed(r), []).append(r[metric])
    if len(by_draw) < 2:
        return None, None
    means = [statistics.fmean(v) for v in by_draw.values()]
    variances = [statistics.variance(v) for v in by_draw.values() if len(v) > 1]
    return statistics.stdev(means), (math.sqrt(statistics.fmean(variances)) if variances else None)


def summarize_results(rows: list[dict], metric: str = "exact_match_strict") -> list[GroupStats]:
    """Mean and standard deviation over seeds (and draws of the data, pooled) per (method,
    r_sample, r_token), the budget-free methods first (`full`, then `oracle`), then budgets from
    the largest down; `best` marks, in each budget run by two or more methods, the method(s) with
    the highest mean `metric` (the controls of experiments, `grid.is_control`, take no part: they
    bound the methods). With several draws, `draw_std` and `seed_std` split the spread of `metric`
    (`draw_spread`)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["r_sample"], row["r_token"]), []).append(row)
    stats = []
    for (method, r_sample, r_token), members in groups.items():
        members.sort(key=lambda r: (data_seed(r), r["seed"]))
        mean, std = {}, {}
        for key, *_ in COLUMNS:
            mean[key], std[key] = _mean_std([r[key] for r in members if r.get(key) is not None])
        stats.append(GroupStats(method, r_sample, r_token, members[0]["nominal_budget"],
                                [r["seed"] for r in members], mean, std, data_seeds=[data_seed(r) for r in members]))
        stats[-1].draw_std, stats[-1].seed_std = draw_spread(members, metric)
    stats.sort(key=lambda g: (g.method not in BUDGET_FREE, -g.nominal_budget, -g.r_sample, g.method))
    budgeted = [g for g in stats if g.method not in BUDGET_FREE and not is_control(g.method)]
    for key in {(g.r_sample, g.r_token) for g in budgeted}:
        rivals = [g for g in budgeted if (g.r_sample, g.r_token) == key and g.mean[metric] is not None]
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
    """Headers, formatted rows and the (row, column) cells to emphasise (best of its budget).
    With several draws of the data, "seeds" reads draws x seeds, and two columns after the
    metric's split its spread: across draws and across training seeds within a draw."""
    several = any(len(set(g.data_seeds)) > 1 for g in stats)
    headers = ["method", "budget", "r_sample x r_token", "draws x seeds" if several else "seeds"]
    for key, header, *_ in COLUMNS:
        headers.append(header)
        if several and key == metric:
            headers += ["std across draws", "std across seeds"]
    metric_column = headers.index(next(h for k, h, *_ in COLUMNS if k == metric))
    rows, bold = [], set()
    for i, g in enumerate(stats):
        row = [g.method, f"{g.nominal_budget:.4g}", g.budget_label, g.runs_label]
        for key, _, scale, decimals in COLUMNS:
            row.append(_format_stat(g.mean[key], g.std[key], scale, decimals))
            if several and key == metric:
                row += ["-" if v is None else f"{100 * v:.1f}" for v in (g.draw_std, g.seed_std)]
        rows.append(row)
        if g.best:
            bold.add((i, metric_column))
    return headers, rows, bold


def markdown_results(stats: list[GroupStats], metric: str) -> str:
    from ..report import format_table

    headers, rows, bold = results_table(stats, metric)
    rows = [[f"**{c}**" if (i, j) in bold else c for j, c in enumerate(row)] for i, row in enumerate(rows)]
    return format_table(headers, rows)


def csv_results(stats: list[GroupStats]) -> str:
    """One line per (method, budget): means, standard deviations (empty with one seed), best flag."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "r_sample", "r_token", "nominal_budget", "seeds", "data_seeds", "best"]
                    + [f"{k}_{s}" for k, *_ in COLUMNS for s in ("mean", "std")] + ["metric_std_across_draws",
                                                                                     "metric_std_across_seeds"])
    for g in stats:
        values = []
        for key, *_ in COLUMNS:
            values += ["" if g.mean[key] is None else repr(g.mean[key]), "" if g.std[key] is None else repr(g.std[key])]
        values += ["" if v is None else repr(v) for v in (g.draw_std, g.seed_std)]
        writer.writerow([g.method, g.r_sample, g.r_token, g.nominal_budget, " ".join(map(str, g.seeds)),
                         " ".join(map(str, g.data_seeds)), int(g.best)] + values)
    return buffer.getvalue()


def _members(rows: list[dict], g: GroupStats) -> list[dict]:
    """The rows of `g`'s (method, r_sample, r_token), one per seed."""
    return [r for r in rows if (r["method"], r["r_sample"], r["r_token"]) == (g.method, g.r_sample, g.r_token)]


def _group_table(rows: list[dict], stats: list[GroupStats], key: str, cell) -> tuple[list[str], list[list]] | None:
    """The rows that have a dict under `key` (name -> entry), one table row per (method, budget):
    `cell(entries)` for each name, over that group's seeds. Returns the names and the table, None
    when no row has `key`."""
    keyed = [r for r in rows if r.get(key)]
    if not keyed:
        return None
    names = sorted({name for r in keyed for name in r[key]})
    table = [[g.method, g.budget_label] + [cell([r[key][n] for r in members if n in r[key]]) for n in names]
             for g in stats if (members := _members(keyed, g))]
    return names, table


def audit_rows(rows: list[dict], stats: list[GroupStats], text=str,
               key: str = "audit") -> tuple[list[str], list[list[str]]] | None:
    """Per (method, budget): the share of each category's sample appearances that were not trained
    on, averaged over seeds (`key` "audit"; "audit_kind": per category/kind). None when the
    training data has no categories (kinds). The category names come from the data: `text` writes
    them into the headers (`markdown_text` for Markdown)."""
    grouped = _group_table(rows, stats, key,
                           lambda entries: _format_stat(*_mean_std([e["dropped_share"] for e in entries]), 100, 1))
    if grouped is None:
        return None
    categories, table = grouped
    return ["method", "r_sample x r_token"] + [f"dropped {text(c)} %" for c in categories], table


#: The phases of a step in the order they run (`qtune.phases`); triage and token_select lie inside select.
PHASES = ("score", "select", "triage", "token_select", "pack", "forward", "backward", "optimizer")


def phase_rows(rows: list[dict], stats: list[GroupStats]) -> tuple[list[str], list[list[str]]] | None:
    """Per (method, budget): mean seconds of each phase of the run over seeds (cells without
    phase timings, from before they were recorded, are left out). None when no cell has them."""
    timed = [r for r in rows if r.get("phase_seconds")]
    if not timed:
        return None
    phases = [p for p in PHASES if any(p in r["phase_seconds"] for r in timed)]
    table = []
    for g in stats:
        members = _members(timed, g)
        if members:
            table.append([g.method, g.budget_label] + [
                _format_stat(*_mean_std([r["phase_seconds"].get(p, 0.0) for r in members]), 1, 2) for p in phases])
    return ["method", "r_sample x r_token"] + [f"{p} s" for p in phases], table


#: The baseline every other pruning method is compared with at its own budget.
RANDOM = "random"

COMPARISON_NOTE = (
    "Difference of mean accuracy in percentage points, and the same difference in units of the pooled "
    "standard deviation sqrt((s1^2 + s2^2) / 2) of the two groups over seeds. Verdict: win or loss when the "
    "difference exceeds one pooled standard deviation, tie otherwise (a reading aid with few seeds, not a "
    "significance test). Wall = mean wall time (scoring + training) relative to full data.")


def _difference(g: GroupStats, other: GroupStats | None, metric: str) -> tuple[float, float | None] | None:
    """(Δ in points, pooled standard deviation in points) of `g` against `other`; the pooled std is
    None when either has a single seed; None when either has no mean."""
    if other is None or g.mean[metric] is None or other.mean[metric] is None:
        return None
    delta = 100 * (g.mean[metric] - other.mean[metric])
    if g.std[metric] is None or other.std[metric] is None:
        return delta, None
    return delta, 100 * math.sqrt((g.std[metric] ** 2 + other.std[metric] ** 2) / 2)


def _verdict(delta: float, pooled: float) -> str:
    return "tie" if abs(delta) <= pooled else ("win" if delta > 0 else "loss")


def versus(g: GroupStats, other: GroupStats | None, metric: str) -> list[str]:
    """Δ (pp), Δ in pooled standard deviations and the verdict of `g` against `other`."""
    difference = _difference(g, other, metric)
    if difference is None:
        return ["-", "-", "-"]
    delta, pooled = difference
    if pooled is None:
        return [f"{delta:+.1f}", "-", "one seed"]
    return [f"{delta:+.1f}", f"{delta / pooled:+.2f}" if pooled else "-", _verdict(delta, pooled)]


def comparison_rows(stats: list[GroupStats], metric: str) -> tuple[list[str], list[list[str]]] | None:
    """Every (method, budget) but full data against random pruning at the same budget (none for
    the budget-free methods) and against full data: accuracy difference, in pooled standard
    deviations, verdict; and the wall-time ratio. None when only full data was run."""
    full = next((g for g in stats if g.method == FULL), None)
    randoms = {(g.r_sample, g.r_token): g for g in stats if g.method == RANDOM}
    table = []
    for g in stats:
        if g.method == FULL:
            continue
        baseline = (randoms.get((g.r_sample, g.r_token)) if g.method != RANDOM and g.method not in BUDGET_FREE
                    else None)
        wall = ("-" if full is None or not full.mean["wall_seconds"] or g.mean["wall_seconds"] is None
                else f"{g.mean['wall_seconds'] / full.mean['wall_seconds']:.2f}x")
        table.append([g.method, g.budget_label] + versus(g, baseline, metric) + versus(g, full, metric) + [wall])
    if not table:
        return None
    return (["method", "r_sample x r_token", "vs random (pp)", "in std", "verdict", "vs full (pp)", "in std",
             "verdict", "wall vs full"], table)


DRAWS_NOTE = (
    "The same comparisons on each draw of the data alone (its training seeds only): a verdict that holds on "
    "one draw and not on another is a property of that draw, not of the method. Each entry: difference in "
    "points, in pooled standard deviations of that draw's seeds, verdict.")


def draw_rows(rows: list[dict], stats: list[GroupStats], metric: str) -> tuple[list[str], list[list[str]]] | None:
    """Per (method, budget) of `stats` (`summarize_results` of `rows`) but full data: the comparison
    against random pruning at the same budget and against full data on each draw of the data alone.
    None with fewer than two draws."""
    draws = sorted({data_seed(r) for r in rows})
    if len(draws) < 2:
        return None
    per_draw = {d: {(h.method, h.r_sample, h.r_token): h
                    for h in summarize_results([r for r in rows if data_seed(r) == d], metric)} for d in draws}
    table = []
    for g in stats:
        if g.method == FULL:
            continue
        against_random, against_full = [], []
        for d in draws:
            groups = per_draw[d]
            own = groups.get((g.method, g.r_sample, g.r_token))
            random = (groups.get((RANDOM, g.r_sample, g.r_token))
                      if g.method != RANDOM and g.method not in BUDGET_FREE else None)
            full = next((h for h in groups.values() if h.method == FULL), None)
            for other, column in ((random, against_random), (full, against_full)):
                delta, in_std, verdict = versus(own, other, metric) if own is not None else ["-"] * 3
                column.append("-" if delta == "-" else f"{delta} ({in_std}) {verdict}")
        table.append([g.method, g.budget_label] + against_random + against_full)
    headers = (["method", "r_sample x r_token"] + [f"vs random, draw {d}" for d in draws]
               + [f"vs full, draw {d}" for d in draws])
    return headers, table


#: The method whose comparisons the reports state first, in words: the library's own. Without it in
#: the results, every pruning method that is neither random nor a control takes its place.
PRIMARY = "qtuning"
#: What a primary method is compared with at its own budget, in this order, and how the sentences
#: name it: random pruning, random pruning at the loss-token count Q-Tuning measured, and the
#: ceiling (the control that reads the defect labels: clean samples first, at the budget's token
#: share when it ran, else whole). Full data comes between the baselines and the ceiling.
BASELINES = (("random", "random"), ("token_matched_random", "token-matched random"))
CEILINGS = (("oracle_ratio+random", "the ceiling (oracle_ratio+random: clean samples first)"),
            ("oracle_ratio", "the ceiling (oracle_ratio: clean samples first, whole)"))


def _sentence(g: GroupStats, other: GroupStats, other_name: str, metric: str) -> str:
    delta, pooled = _difference(g, other, metric)
    scores = f"{100 * g.mean[metric]:.1f}% against {100 * other.mean[metric]:.1f}%"
    subject = f"{g.method} at {g.budget_label}"
    if pooled is None:
        return (f"{subject} against {other_name}: {scores}, {delta:+.1f} points (one seed: no standard deviation, "
                "so no verdict).")
    verdict = _verdict(delta, pooled)
    verb = {"win": "beats", "tie": "ties with", "loss": "loses to"}[verdict]
    spread = f"{delta / pooled:+.1f} pooled std" if pooled else "no spread over seeds"
    return f"{subject} {verb} {other_name}: {scores}, {delta:+.1f} points, {spread} ({verdict})."


def verdict_sentences(stats: list[GroupStats], metric: str) -> list[str]:
    """One plain sentence per primary comparison: each budget of `PRIMARY` (or of every pruning
    method but random and the controls, when it did not run) against random, token-matched random,
    full data and the ceiling, where those rows exist: the two accuracies, the difference in points
    and in pooled standard deviations, and the verdict (win or loss beyond one pooled std; with one
    seed, the difference in points and no verdict)."""
    budgeted = [g for g in stats if g.method not in BUDGET_FREE and g.mean[metric] is not None]
    primary = [g for g in budgeted if g.method == PRIMARY] or [
        g for g in budgeted if g.method != RANDOM and not is_control(g.method)]
    full = next((g for g in stats if g.method == FULL and g.mean[metric] is not None), None)
    at_budget = {(g.method, g.r_sample, g.r_token): g for g in budgeted}
    sentences = []
    for g in primary:
        others = [(at_budget.get((method, g.r_sample, g.r_token)), name) for method, name in BASELINES]
        others.append((full, "full data"))
        ceilings = [(at_budget.get((method, g.r_sample, g.r_token)), name) for method, name in CEILINGS]
        others.append(next((c for c in ceilings if c[0] is not None), (None, "")))
        sentences += [_sentence(g, other, name, metric) for other, name in others if other is not None]
    return sentences


def answer_rows(rows: list[dict], stats: list[GroupStats]) -> tuple[list[str], list[list[str]]] | None:
    """Per (method, budget), mean ± std over seeds: format compliance (answers with a `#### N`
    line) and the strict accuracy per difficulty level of the evaluation records. None when no
    cell recorded them (cells from before they were)."""
    recorded = [r for r in rows if r.get("format_compliance") is not None]
    if not recorded:
        return None
    levels = sorted({k for r in recorded for k in (r.get("accuracy_by_difficulty") or {})})
    table = []
    for g in stats:
        members = _members(recorded, g)
        if members:
            cells = [_format_stat(*_mean_std([r["format_compliance"] for r in members]), 100, 1)]
            for level in levels:
                values = [r["accuracy_by_difficulty"][level] for r in members
                          if level in (r.get("accuracy_by_difficulty") or {})]
                cells.append(_format_stat(*_mean_std(values), 100, 1))
            table.append([g.method, g.budget_label] + cells)
    return ["method", "r_sample x r_token", "format %"] + [f"difficulty {level} %" for level in levels], table


TOKEN_AUDIT_NOTE = (
    "For the samples a step trained on: the share of the tokens of the answer's final line (e.g. `#### N`) "
    "that kept their loss, then the share of the other response tokens, in percent, averaged over seeds. "
    "The final line is where every teacher error, swapped answer and format defect is certainly wrong; a "
    "method that recognises wrong tokens keeps fewer final-line tokens of defective records than of clean "
    "ones. Off-task and swapped records are wrong throughout; a truncated record's defect is its missing line.")


def token_audit_rows(rows: list[dict], stats: list[GroupStats], text=str) -> tuple[list[str], list[list[str]]] | None:
    """Per (method, budget) and category/kind, averaged over seeds: the share of the final-line
    tokens of the trained appearances that kept their loss / the same share of the other response
    tokens (`qtune.report.token_audit`), as "final/other" in percent. None when no cell has it."""
    def cell(entries: list[dict]) -> str:
        means = [_mean_std([e[part] for e in entries if e[part] is not None])[0] for part in ("final_kept", "other_kept")]
        return "/".join("-" if m is None else f"{100 * m:.0f}" for m in means)

    grouped = _group_table(rows, stats, "audit_tokens", cell)
    if grouped is None:
        return None
    kinds, table = grouped
    return ["method", "r_sample x r_token"] + [f"{text(k)} final/other %" for k in kinds], table

"""Figures. matplotlib is an optional dependency (`pip install qtune[plots]`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .errors import QTuneError
from .io import atomic_path
from .pruning import QUADRANT_NAMES, QUADRANT_ORDER

QUADRANT_COLORS = {1: "#d62728", 2: "#ff7f0e", 3: "#7f7f7f", 4: "#1f77b4", 0: "#bcbd22"}
CATEGORY_MARKERS = ("o", "x", "^", "s", "D", "v", "P")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise QTuneError("plots need matplotlib: pip install 'qtune[plots]' (or pass --no-plot)") from exc
    return plt


def plot_eu_plane(
    path: str | Path,
    ppl: Sequence[float],
    ent: Sequence[float],
    quadrant: Sequence[int],
    thresholds: dict[str, float],
    *,
    title: str = "Error-Uncertainty plane",
    categories: Sequence[str] | None = None,
) -> Path:
    """Scatter of log-PPL (x) against entropy (y), coloured by quadrant, boundaries drawn.

    With `categories` (ground truth, e.g. the testbed's clean/noise/redundant), each category
    gets its own marker so a reader sees where each kind of sample landed.
    """
    plt = _pyplot()
    log_ppl = [math.log(p) for p in ppl]
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    cats = list(categories) if categories is not None else ["all"] * len(log_ppl)
    markers = {c: CATEGORY_MARKERS[i % len(CATEGORY_MARKERS)] for i, c in enumerate(sorted(set(cats)))}
    for q in QUADRANT_ORDER:
        for cat, marker in markers.items():
            idx = [i for i, (qq, cc) in enumerate(zip(quadrant, cats)) if qq == q and cc == cat]
            if not idx:
                continue
            label = QUADRANT_NAMES[q] if categories is None else f"{QUADRANT_NAMES[q]} / {cat}"
            ax.scatter([log_ppl[i] for i in idx], [ent[i] for i in idx], s=9, alpha=0.6,
                       c=QUADRANT_COLORS[q], marker=marker, label=label, linewidths=0.6)
    for key in ("ppl_lo", "ppl_hi"):
        ax.axvline(math.log(thresholds[key]), color="k", lw=0.8, ls="--")
    for key in ("ent_lo", "ent_hi"):
        ax.axhline(thresholds[key], color="k", lw=0.8, ls="--")
    ax.set_xlabel("log PPL (error)")
    ax.set_ylabel("mean entropy (uncertainty)")
    ax.set_title(title)
    ax.legend(fontsize=6, markerscale=1.5, loc="best", ncol=2 if categories is not None else 1)
    fig.tight_layout()
    return _save_figure(fig, path)


METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _method_style(plt, i: int) -> dict:
    """Marker and colour of the i-th method: 20 distinct colours (tab20), so that a grid of many
    methods gives no two the same look."""
    return {"marker": METHOD_MARKERS[i % len(METHOD_MARKERS)], "color": plt.get_cmap("tab20")(i % 20)}


def _save_figure(fig, path: str | Path) -> Path:
    """Save atomically (the layout is the figure's own) and close."""
    plt = _pyplot()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_selection(path: str | Path, score: Sequence[float], kept: Sequence[bool], *, title: str) -> Path:
    """Histogram of a selector's per-sample score, kept and dropped samples stacked (`qtune
    select`); infinite scores (an undefined IFD) are left out and counted in the legend."""
    plt = _pyplot()
    finite = [(v, k) for v, k in zip(score, kept) if math.isfinite(v)]
    left_out = len(score) - len(finite)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    values = [[v for v, k in finite if k], [v for v, k in finite if not k]]
    ax.hist(values, bins=40, stacked=True, color=["tab:green", "tab:gray"],
            label=[f"kept ({len(values[0])})", f"dropped ({len(values[1])})"])
    ax.set_xlabel("score")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, title=f"{left_out} not finite, left out" if left_out else None)
    return _save_figure(fig, path)


def _finish_line_plot(fig, ax, path: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, legend and grid shared by the accuracy plots, then save."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(ax.get_legend_handles_labels()[1]) > 8:  # many methods: beside the axes, not over the points
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def plot_accuracy_vs_budget(
    path: str | Path,
    series: dict[str, Sequence[tuple[float, float, float | None]]],
    full: tuple[float, float | None] | None = None,
    *,
    ylabel: str = "exact match (%)",
    title: str = "Accuracy against budget",
) -> Path:
    """One line per method through its (budget, mean, std) points, std as error bars, on a log-scale
    budget axis; `full` = (mean, std) of full-data training as a horizontal line with its band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120, layout="tight")
    for i, (method, points) in enumerate(sorted(series.items())):
        points = sorted(points)
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                    capsize=3, label=method, **_method_style(plt, i))
    if full is not None:
        mean, std = full
        ax.axhline(mean, color="k", ls="--", lw=1, label="full data")
        if std:
            ax.axhspan(mean - std, mean + std, color="k", alpha=0.08, lw=0)
    ax.set_xscale("log")
    budgets = sorted({p[0] for points in series.values() for p in points})
    if budgets:
        ax.set_xticks(budgets)
        ax.set_xticklabels([f"{b:.3g}" for b in budgets], rotation=45)
        ax.minorticks_off()
    return _finish_line_plot(fig, ax, path, "nominal budget r_sample x r_token (log scale)", ylabel, title)


def plot_accuracy_vs_time(
    path: str | Path,
    points: dict[str, Sequence[tuple[float, float | None, float, float | None, str]]],
    *,
    ylabel: str = "exact match (%)",
    title: str = "Accuracy against wall time",
) -> Path:
    """Per method, its (time mean, time std, accuracy mean, accuracy std, label) points with error
    bars in both directions, each point labelled (e.g. with its budget)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120, layout="tight")
    for i, (method, pts) in enumerate(sorted(points.items())):
        pts = sorted(pts)
        ax.errorbar([p[0] for p in pts], [p[2] for p in pts], xerr=[p[1] or 0.0 for p in pts],
                    yerr=[p[3] or 0.0 for p in pts], ls="" if len(pts) == 1 else "-", capsize=3, label=method,
                    **_method_style(plt, i))
        for x, _, y, _, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    return _finish_line_plot(fig, ax, path, "wall time per run: scoring + training (s)", ylabel, title)


def plot_kept_eu_plane(
    path: str | Path,
    ppl: Sequence[float],
    ent: Sequence[float],
    panels: Sequence[tuple[str, Sequence[float | None]]],
    *,
    categories: Sequence[str] | None = None,
    title: str = "What was trained on",
) -> Path:
    """Panels of the same EU-plane scatter (log-PPL x, entropy y), each coloured by its own per-sample
    share in [0, 1] (e.g. how often a run trained on the sample); None draws a small grey dot
    (never seen). `categories` gives each ground-truth category its own marker."""
    plt = _pyplot()
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    # constrained, not tight: the colorbar spans several axes.
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4 * rows + 0.6), dpi=110, squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    log_ppl = [math.log(p) for p in ppl]
    cats = list(categories) if categories is not None else ["all"] * len(log_ppl)
    markers = {c: CATEGORY_MARKERS[i % len(CATEGORY_MARKERS)] for i, c in enumerate(sorted(set(cats)))}
    mappable = None
    for ax, (panel_title, shares) in zip(axes.flat, panels):
        unseen = [i for i, s in enumerate(shares) if s is None]
        ax.scatter([log_ppl[i] for i in unseen], [ent[i] for i in unseen], s=3, c="#cccccc", linewidths=0)
        for cat, marker in markers.items():
            idx = [i for i, (s, c) in enumerate(zip(shares, cats)) if s is not None and c == cat]
            if idx:
                mappable = ax.scatter([log_ppl[i] for i in idx], [ent[i] for i in idx], c=[shares[i] for i in idx],
                                      cmap="RdYlBu", vmin=0, vmax=1, s=10, marker=marker, linewidths=0.6,
                                      alpha=0.8, label=cat if categories is not None else None)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("log PPL (error)")
        ax.set_ylabel("mean entropy (uncertainty)")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if categories is not None:
        axes.flat[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=11)
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.8, label="share of its appearances trained on (blue: kept)")
    return _save_figure(fig, path)


def plot_eu_plane_by_group(
    path: str | Path,
    ppl: Sequence[float],
    ent: Sequence[float],
    groups: Sequence[str],
    thresholds: dict[str, float] | None = None,
    *,
    order: Sequence[str] | None = None,
    title: str = "Error-Uncertainty plane",
) -> Path:
    """Scatter of log-PPL (x) against entropy (y), one colour per group (e.g. `qtune audit`'s
    planted kinds), the i-th group of `order` (default: sorted) in the i-th colour of tab10, as
    `plot_drop_rates` colours its groups; drawn largest group first so that small groups stay
    visible. `thresholds` (ppl_lo, ppl_hi, ent_lo, ent_hi) draws the quadrant boundaries."""
    plt = _pyplot()
    log_ppl = [math.log(p) for p in ppl]
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    order = [g for g in (order or sorted(set(groups))) if g in set(groups)]
    for name in sorted(order, key=lambda g: -list(groups).count(g)):
        i = order.index(name)
        idx = [j for j, g in enumerate(groups) if g == name]
        ax.scatter([log_ppl[j] for j in idx], [ent[j] for j in idx], s=10, alpha=0.7, linewidths=0.6,
                   color=plt.get_cmap("tab10")(i % 10), marker=CATEGORY_MARKERS[i % len(CATEGORY_MARKERS)],
                   label=f"{name} ({len(idx)})")
    if thresholds:
        for key in ("ppl_lo", "ppl_hi"):
            ax.axvline(math.log(thresholds[key]), color="k", lw=0.8, ls="--")
        for key in ("ent_lo", "ent_hi"):
            ax.axhline(thresholds[key], color="k", lw=0.8, ls="--")
    ax.set_xlabel("log PPL (error)")
    ax.set_ylabel("mean entropy (uncertainty)")
    ax.set_title(title)
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_drop_rates(
    path: str | Path,
    rates: dict[str, dict[str, float | None]],
    groups: Sequence[str],
    reference: float | None = None,
    *,
    title: str = "Drop rate per planted kind",
    ylabel: str = "share dropped",
    reference_label: str = "random",
) -> Path:
    """Grouped bars: per method (x, in the order of `rates`) one bar per group, its share in
    [0, 1] (None: no bar); `reference` (e.g. random's drop share) as a dashed line."""
    plt = _pyplot()
    methods = list(rates)
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(methods) + 2), 4.8), dpi=120, layout="constrained")
    for i, group in enumerate(groups):
        xs = [m + (i - (len(groups) - 1) / 2) * width for m in range(len(methods))]
        values = [rates[name].get(group) for name in methods]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width,
               label=group, color=plt.get_cmap("tab10")(i % 10))
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=40, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save_figure(fig, path)

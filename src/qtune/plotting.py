"""Figures. matplotlib is an optional dependency (`pip install qtune[plots]`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .errors import QTuneError
from .io import atomic_path
from .report import QUADRANT_LABELS, QUADRANT_ORDER

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
            label = QUADRANT_LABELS[q] if categories is None else f"{QUADRANT_LABELS[q]} / {cat}"
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
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path

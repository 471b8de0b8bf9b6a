"""Plain-text tables for summaries printed by the commands and written next to their outputs."""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from .data import record_id_of
from .pruning import QUADRANT_NAMES, QUADRANT_ORDER


def format_table(headers: Sequence[str], rows: Sequence[Sequence], align_first_left: bool = True) -> str:
    """A GitHub-flavoured Markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        parts = [
            c.ljust(w) if (i == 0 and align_first_left) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def wrapped_table(headers: Sequence[str], rows: Sequence[Sequence], width: int = 100, key_columns: int = 2) -> str:
    """`format_table` for a terminal `width` characters wide: when the whole table is wider, its
    columns are split into several tables, one under the other, each repeating the first
    `key_columns` (what names a row) and taking as many of the next columns as fit. No cell is
    cut; a single column too wide for `width` gets a table of its own."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    keys = list(range(min(key_columns, len(headers))))

    def line_length(columns: list[int]) -> int:  # "| a | b |": each column adds its width and 3
        return 1 + sum(widths[i] + 3 for i in columns)

    blocks, block = [], []
    for i in range(len(keys), len(headers)):
        if block and line_length(keys + block + [i]) > width:
            blocks.append(block)
            block = []
        block.append(i)
    blocks.append(block)
    return "\n\n".join(format_table([headers[i] for i in keys + b], [[row[i] for i in keys + b] for row in rows])
                        for b in blocks)


#: Characters that GitHub-flavoured Markdown can read as markup inside a table cell.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~])")


def markdown_text(text: str) -> str:
    """`text` as literal Markdown: markup characters backslash-escaped, line breaks as spaces, so
    that a value from the data (a category name) can neither end its table cell nor format
    anything. For data-derived text only; the tables' own words are written as they are."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def quantile_rows(name: str, values: Sequence[float], qs=(0.0, 0.25, 0.5, 0.75, 1.0)) -> list:
    ordered = sorted(values)
    n = len(ordered)
    return [name] + [ordered[min(n - 1, int(round(q * (n - 1))))] for q in qs]


def score_summary(ppl: Sequence[float], ent: Sequence[float], quadrant: Sequence[int], r_sample: float) -> str:
    """Quantiles of both axes and the quadrant counts of a scored dataset."""
    quantiles = format_table(["score", "min", "q25", "median", "q75", "max"],
                             [quantile_rows("PPL", ppl), quantile_rows("entropy", ent)])
    counts = Counter(quadrant)
    n = len(quadrant)
    quad_rows = [[QUADRANT_NAMES[q], counts.get(q, 0), f"{100 * counts.get(q, 0) / n:.1f}%"] for q in QUADRANT_ORDER]
    quads = format_table([f"quadrant (r_sample={r_sample:g})", "samples", "share"], quad_rows)
    return f"{n} samples\n\n{quantiles}\n\n{quads}"


def category_quadrant_table(categories: Sequence[str], quadrant: Sequence[int]) -> str:
    """Rows: ground-truth categories; columns: share of each category in each quadrant."""
    by_cat: dict[str, Counter] = {}
    for cat, q in zip(categories, quadrant):
        by_cat.setdefault(cat, Counter())[q] += 1
    rows = []
    for cat in sorted(by_cat):
        total = sum(by_cat[cat].values())
        rows.append([markdown_text(cat), total]
                    + [f"{100 * by_cat[cat].get(q, 0) / total:.1f}%" for q in QUADRANT_ORDER])
    return format_table(["category", "n"] + [QUADRANT_NAMES[q] for q in QUADRANT_ORDER], rows)


def pruning_audit(step_rows: Sequence[dict], category_of: dict[int, str]) -> dict[str, dict]:
    """Per ground-truth category: how often its samples were seen by a training step and how
    often they were trained on (an epoch shows each sample once), from a run's step log."""
    seen, kept = Counter(), Counter()
    for row in step_rows:
        seen.update(category_of[record_id_of(i)] for i in row["sample_ids"])
        kept.update(category_of[record_id_of(i)] for i in row["kept_ids"])
    return {cat: {"seen": seen[cat], "kept": kept[cat], "dropped_share": 1 - kept[cat] / seen[cat]}
            for cat in sorted(seen)}


#: Roles of a response token in the token-level audit: on the answer's final line, elsewhere in
#: the response, or a special token (end of turn) that belongs to neither.
FINAL, OTHER, SPECIAL = "f", "o", "s"


def response_token_roles(pieces: Sequence[str]) -> str:
    """One role per response token, given each token's text ("" for a special token): FINAL for
    the tokens after the last one that holds a line break (the answer's last line, e.g. `#### 9`),
    OTHER before, SPECIAL for the empty ones. A token holding a line break counts as OTHER, so a
    token that joins the last break and the start of the last line is not counted in it."""
    start = max((i + 1 for i, p in enumerate(pieces) if "\n" in p), default=0)
    return "".join(SPECIAL if not p else FINAL if i >= start else OTHER for i, p in enumerate(pieces))


def token_audit(step_rows: Sequence[dict], group_of: dict[int, str], roles: dict[int, str]) -> dict[str, dict]:
    """Per group (e.g. category/kind, keyed by record id): over the appearances of its samples that
    a step trained on, the share of final-line response tokens (`response_token_roles`) that kept
    their loss, and the share of the other, non-special response tokens, from the step log's
    `kept_token_masks` (a step without it, or a sample without roles, is not counted). Groups
    with no trained appearance are left out; a share whose tokens never appeared is None."""
    counts: dict[str, Counter] = {}
    for row in step_rows:
        for sample_id, mask in row.get("kept_token_masks", {}).items():
            role = roles.get(int(sample_id))
            if role is None or len(role) != len(mask):
                continue
            c = counts.setdefault(group_of[record_id_of(int(sample_id))], Counter())
            c["appearances"] += 1
            for r, m in zip(role, mask):
                c[r] += 1
                c[r + m] += 1  # e.g. "f1": a final-line token that kept its loss

    def share(c: Counter, role: str):
        return c[role + "1"] / c[role] if c[role] else None

    return {group: {"appearances": c["appearances"], "final_kept": share(c, FINAL), "other_kept": share(c, OTHER)}
            for group, c in sorted(counts.items())}


def accuracy_by(predictions: Sequence[dict], field: str, metric: str = "strict") -> dict[str, float] | None:
    """Accuracy (`correct_<metric>` of `qtune eval`'s predictions.jsonl rows) per value of a
    metadata `field` of the evaluation records (e.g. difficulty), None when no record has it."""
    groups: dict[str, list[bool]] = {}
    for p in predictions:
        if p.get(field) is not None:
            groups.setdefault(str(p[field]), []).append(bool(p[f"correct_{metric}"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())} or None

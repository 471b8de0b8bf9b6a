"""The reports of a bench run, built from OUT/results.jsonl at the end of a run or alone with
`--report-only`: results.md, results.csv, plots/ (accuracy against budget and time, what each method
kept on the base model's EU plane) and the self-contained report.html with token pruning examples.
See docs/bench.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import QTuneError
from ..io import read_jsonl, write_text
from .grid import BUDGET_FREE, FULL, BenchConfig, budget_label
from .results import RESULTS_FILE, load_settings, read_results
from .stats import (COLUMNS, COMPARISON_NOTE, DRAWS_NOTE, TOKEN_AUDIT_NOTE, GroupStats, answer_rows, audit_rows,
                    comparison_rows, csv_results, data_seed, draw_rows, markdown_results, phase_rows, results_table,
                    summarize_results, token_audit_rows, verdict_sentences)

#: The budget whose Q2 samples the HTML report shows with their pruned tokens, when it is in the grid.
EXAMPLE_BUDGET = (0.25, 0.7)


def write_reports(out: Path, cfg: BenchConfig) -> dict[str, Path]:
    """results.md, results.csv, plots/*.png and report.html from OUT/results.jsonl.

    results.md and report.html open with the results: the verdict sentences, the results table
    and the wins, ties and losses; then the plots and the audits; the settings come last."""
    from ..report import format_table, markdown_text

    settings = load_settings(out)
    rows = read_results(out / RESULTS_FILE)
    if not rows:
        raise QTuneError(f"{out / RESULTS_FILE}: no finished cell to report on")
    metric = f"exact_match_{cfg.metric}"
    stats = summarize_results(rows, metric)
    written = {}
    plots, examples, eu_note = {}, [], ""
    if cfg.plots:
        plots = _draw_result_plots(out / "plots", stats, metric)
        try:
            base = base_model_scores(out, settings)
        except QTuneError as exc:  # e.g. the base model is gone: the other reports are still worth having
            print(f"warning: no EU-plane figures nor token examples: {exc}", file=sys.stderr, flush=True)
            base = None
        if base is not None:  # the base model's scores are those of the preset's own draw of the data
            plots.update(_draw_eu_planes(out, [r for r in rows if data_seed(r) == 0], base, settings))
            eu_note = base["note"]
            if cfg.examples:
                examples = token_examples(base, settings, rows, cfg.examples)
    written.update(plots)
    verdicts = verdict_sentences(stats, metric)
    markdown = "# Benchmark results\n\n"
    if verdicts:
        markdown += "".join(f"- {v}\n" for v in verdicts) + "\n"
    markdown += "## Results\n\n" + markdown_results(stats, metric) + "\n"
    comparison = comparison_rows(stats, metric)
    if comparison is not None:
        markdown += "\n## Wins, ties and losses\n\n" + COMPARISON_NOTE + "\n\n" + format_table(*comparison) + "\n"
    draws = draw_rows(rows, stats, metric)
    if draws is not None:
        markdown += "\n## Draw by draw\n\n" + DRAWS_NOTE + "\n\n" + format_table(*draws) + "\n"
    if plots:
        markdown += "\n## Plots\n\n" + "".join(f"![{name}]({path.relative_to(out).as_posix()})\n"
                                                for name, path in plots.items())
    audit = audit_rows(rows, stats)  # for the HTML report, which escapes every text itself
    if audit is not None:
        markdown += ("\n## Pruning audit (dropped share per category)\n\n"
                     + format_table(*audit_rows(rows, stats, markdown_text)) + "\n")
    audit_kind = audit_rows(rows, stats, key="audit_kind")
    if audit_kind is not None:
        markdown += ("\n## Pruning audit per kind (dropped share per category/kind)\n\n"
                     + format_table(*audit_rows(rows, stats, markdown_text, key="audit_kind")) + "\n")
    answers = answer_rows(rows, stats)
    if answers is not None:
        markdown += ("\n## Answers: format compliance and accuracy per difficulty (strict)\n\n"
                     + format_table(*answers) + "\n")
    token_audit_table = token_audit_rows(rows, stats)  # for the HTML report, as `audit`
    if token_audit_table is not None:
        markdown += ("\n## Token-level audit (loss kept on final-line tokens / on the other response tokens)\n\n"
                     + TOKEN_AUDIT_NOTE + "\n\n" + format_table(*token_audit_rows(rows, stats, markdown_text)) + "\n")
    phases = phase_rows(rows, stats)
    if phases is not None:
        markdown += ("\n## Time per phase (seconds per run; triage and token_select are part of select)\n\n"
                     + format_table(*phases) + "\n")
    markdown += ("\n## Setup\n\n" + _setup_note(rows, metric) + "\n\n"
                 + format_table(["option", "value"], [[k, markdown_text(v)] for k, v in sorted(settings.items())])
                 + "\n")
    written["markdown"] = out / "results.md"
    write_text(written["markdown"], markdown)
    written["csv"] = out / "results.csv"
    write_text(written["csv"], csv_results(stats))
    written["html"] = out / "report.html"
    _write_html(written["html"], settings, rows, stats, metric, verdicts, comparison, draws, audit, audit_kind,
                answers, token_audit_table, plots, examples, eu_note)
    print(f"reports: {out / 'results.md'}, {out / 'results.csv'}, {out / 'report.html'}", flush=True)
    return written


def _setup_note(rows: list[dict], metric: str) -> str:
    return (f"{len(rows)} finished cells. Ranking metric: {metric.replace('exact_match_', '')} exact match. "
            "The options every cell was made with (OUT/bench.json):")


#: The results table's columns that the terminal summary shows (the others are in results.md).
TERMINAL_COLUMNS = ("method", "r_sample x r_token", "seeds", "loss tokens %", "kept samples %", "wall s")


def terminal_summary(out: Path, metric: str = "exact_match_strict", width: int = 100) -> str:
    """What a terminal shows of a finished run, from OUT/results.jsonl: the verdict sentences, the
    results table's main columns, then the wins, ties and losses against random pruning and
    against full data, every table at most `width` characters wide (`wrapped_table`: columns wrap,
    no number is cut)."""
    import textwrap

    from ..report import wrapped_table

    stats = summarize_results(read_results(out / RESULTS_FILE), metric)
    headers, table, _ = results_table(stats, metric)
    metric_header = next(h for k, h, *_ in COLUMNS if k == metric)
    shown = [headers.index(h) for h in TERMINAL_COLUMNS[:3] + (metric_header,) + TERMINAL_COLUMNS[3:]]
    short = {"r_sample x r_token": "budget"}  # "0.25x0.5" says it; the header would widen the table
    parts = ["\n".join(textwrap.fill(v, width, initial_indent="- ", subsequent_indent="  ")
                        for v in verdict_sentences(stats, metric)),
             wrapped_table([short.get(headers[i], headers[i]) for i in shown],
                           [[row[i] for i in shown] for row in table], width)]
    comparison = comparison_rows(stats, metric)
    if comparison is not None:
        _, rows = comparison
        names = ["method", "budget", "points", "in pooled std", "verdict"]
        against_random = [row[:5] for row in rows if row[4] != "-"]
        if against_random:
            parts.append("Against random pruning at the same budget:\n\n" + wrapped_table(names, against_random, width))
        parts.append("Against full data (wall: scoring + training time relative to full data's):\n\n"
                     + wrapped_table(names + ["wall"], [row[:2] + row[5:] for row in rows], width))
    return "\n\n".join(p for p in parts if p)


def _draw_result_plots(folder: Path, stats: list[GroupStats], metric: str) -> dict[str, Path]:
    from ..plotting import plot_accuracy_vs_budget, plot_accuracy_vs_time

    label = f"{metric.replace('exact_match_', '')} exact match (%)"
    series: dict[str, list] = {}
    timing: dict[str, list] = {}
    full = None
    for g in stats:
        acc = (100 * g.mean[metric], None if g.std[metric] is None else 100 * g.std[metric])
        if g.method == FULL:
            full = acc
        else:
            series.setdefault(g.method, []).append((g.nominal_budget, *acc))
        timing.setdefault(g.method, []).append((g.mean["wall_seconds"], g.std["wall_seconds"], *acc,
                                                g.budget_label))
    return {
        "accuracy_vs_budget": plot_accuracy_vs_budget(folder / "accuracy_vs_budget.png", series, full, ylabel=label),
        "accuracy_vs_time": plot_accuracy_vs_time(folder / "accuracy_vs_time.png", timing, ylabel=label),
    }


def base_model_scores(out: Path, settings: dict) -> dict:
    """PPL, entropy and per-token NLL of every training sample under the BASE model, cached in
    OUT/base_scores.json (rebuilt when model or data settings change).

    Returns {"sample_id", "ppl", "ent", "token_nll", "category", "note"} (lists in sample order).
    """
    key = {k: settings[k] for k in ("model", "data", "format", "limit", "max_length", "dtype")}
    path = out / "base_scores.json"
    if path.exists():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached
    from ..data import load_records, record_id_of, require_pad_token, tokenize_records
    from ..models import load_model, load_tokenizer
    from ..scoring import score_dataset

    tokenizer = load_tokenizer(settings["model"], trust_remote_code=settings["trust_remote_code"],
                               pad_token=settings["pad_token"])
    records, _ = load_records(settings["data"], settings["format"], limit=settings["limit"])
    samples, _ = tokenize_records(records, tokenizer, max_length=settings["max_length"])
    model = load_model(settings["model"], dtype=settings["dtype"], device=settings["device"],
                       trust_remote_code=settings["trust_remote_code"])
    print(f"scoring {len(samples)} training samples with the base model for the report", flush=True)
    scores = score_dataset(model, samples, pad_token_id=require_pad_token(tokenizer),
                           batch_size=settings["batch_size"], per_token=True, chunk_tokens=settings["chunk_tokens"],
                           head_impl=settings.get("head_impl", "auto"),
                           progress=False)
    meta = {r.sample_id: r.metadata for r in records}
    has_categories = any("category" in m for m in meta.values())
    result = {
        "key": key,
        "sample_id": scores.sample_id,
        "ppl": scores.ppl,
        "ent": scores.ent,
        "token_nll": scores.token_nll,
        "category": ([str(meta[record_id_of(s)].get("category", "none")) for s in scores.sample_id]
                     if has_categories else None),
        "note": (f"Positions: PPL and entropy of each training sample under the base model {settings['model']} "
                 "(before any training). Colour: the share of the run's steps that showed the sample in which "
                 "the method trained on it (from its steps.jsonl). Methods that score during training "
                 "(qtuning) decided with the weights of the moment and the quantiles of each batch, so the "
                 "picture is blurred near quadrant boundaries; no threshold lines are drawn because every "
                 "batch had its own."),
    }
    write_text(path, json.dumps(result))
    return result


def kept_share(steps_path: Path, sample_ids: list[int]) -> list[float | None]:
    """Per sample: kept / seen over the run's steps, None for samples no step showed."""
    from collections import Counter

    seen, kept = Counter(), Counter()
    for step in read_jsonl(steps_path):
        seen.update(step["sample_ids"])
        kept.update(step["kept_ids"])
    return [kept[s] / seen[s] if seen[s] else None for s in sample_ids]


def _draw_eu_planes(out: Path, rows: list[dict], base: dict, settings: dict) -> dict[str, Path]:
    """One figure per pruning method, one panel per budget, from the lowest seed that has its steps."""
    from ..plotting import plot_kept_eu_plane

    figures = {}
    methods = sorted({r["method"] for r in rows if r["method"] != FULL})
    for method in methods:
        panels = []
        budgets = sorted({(r["r_sample"], r["r_token"]) for r in rows if r["method"] == method}, reverse=True)
        for r_sample, r_token in budgets:
            runs = sorted((r for r in rows if (r["method"], r["r_sample"], r["r_token"]) == (method, r_sample, r_token)),
                          key=lambda r: r["seed"])
            for run in runs:
                steps = out / "cells" / run["cell"] / "train" / "steps.jsonl"
                if steps.exists():
                    label = (budget_label(method, r_sample, r_token) if method in BUDGET_FREE
                             else f"r_sample={r_sample:g}, r_token={r_token:g}")
                    panels.append((f"{label} (seed {run['seed']})",
                                   kept_share(steps, base["sample_id"])))
                    break
        if panels:
            figures[f"eu_plane_{method}"] = plot_kept_eu_plane(
                out / "plots" / f"eu_plane_{method}.png", base["ppl"], base["ent"], panels,
                categories=base["category"], title=f"{method}: what was trained on, on the base model's EU plane")
    return figures


def _example_budget(rows: list[dict]) -> tuple[float, float]:
    budgets = sorted({(r["r_sample"], r["r_token"]) for r in rows if r["method"] not in BUDGET_FREE})
    if not budgets or EXAMPLE_BUDGET in budgets:
        return EXAMPLE_BUDGET
    return budgets[len(budgets) // 2]


def token_examples(base: dict, settings: dict, rows: list[dict], count: int):
    """Q2 samples of the whole training set (triaged at once with the base model's scores) with the
    response tokens that Stage 2 would prune at the example budget, one per category in turn."""
    import torch

    from ..data import IGNORE_INDEX, load_records, record_id_of, tokenize_records
    from ..html_report import TokenExample
    from ..models import load_tokenizer
    from ..pruning import prune_tokens, token_perplexity, triage

    r_sample, r_token = _example_budget(rows)
    decision = triage(torch.tensor(base["ppl"]), torch.tensor(base["ent"]), r_sample)
    q2 = decision.prune_tokens.nonzero().flatten().tolist()
    categories = base["category"] or ["all"] * len(base["sample_id"])
    queues: dict[str, list[int]] = {}
    for i in q2:
        queues.setdefault(categories[i], []).append(i)
    chosen = []
    while len(chosen) < count and any(queues.values()):
        for cat in sorted(queues):
            if queues[cat] and len(chosen) < count:
                chosen.append(queues[cat].pop(0))
    if not chosen:
        return []
    tokenizer = load_tokenizer(settings["model"], trust_remote_code=settings["trust_remote_code"],
                               pad_token=settings["pad_token"])
    records, _ = load_records(settings["data"], settings["format"], limit=settings["limit"])
    by_id = {r.sample_id: r for r in records}
    wanted = [by_id[record_id_of(base["sample_id"][i])] for i in chosen]
    samples = {s["sample_id"]: s for s in tokenize_records(wanted, tokenizer, max_length=settings["max_length"])[0]}
    examples = []
    for i in chosen:
        sid = base["sample_id"][i]
        sample, nll = samples[sid], torch.tensor(base["token_nll"][i])
        tokppl = token_perplexity(nll)[None]
        mask = prune_tokens(tokppl, torch.ones_like(tokppl, dtype=torch.bool), r_token, lam=settings["lam"],
                            neighbor=settings["neighbor"], edge=settings["edge"])[0].tolist()
        positions = [t for t, label in enumerate(sample["labels"]) if t > 0 and label != IGNORE_INDEX]
        pieces = _token_texts(tokenizer, sample["input_ids"], positions)
        prompt = "\n".join(m["content"] for m in by_id[record_id_of(sid)].messages if m["role"] != "assistant")
        examples.append(TokenExample(
            sample_id=sid, category=categories[i], prompt=prompt,
            tokens=[(text, keep, float(p)) for text, keep, p in zip(pieces, mask, tokppl[0].tolist())],
            ppl=base["ppl"][i], ent=base["ent"][i], r_sample=r_sample, r_token=r_token,
        ))
    return examples


def _token_texts(tokenizer, input_ids: list[int], positions: list[int]) -> list[str]:
    """The text each response token adds, decoded as differences of growing prefixes of its span,
    so that characters split over several byte-level tokens come out whole; a token that ends a
    span, or that is not contiguous with the previous one, starts a new span."""
    texts = []
    span_start = None
    previous_text = ""
    for k, t in enumerate(positions):
        if k == 0 or t != positions[k - 1] + 1:
            span_start, previous_text = t, ""
        text = tokenizer.decode(input_ids[span_start : t + 1], skip_special_tokens=False)
        texts.append(text[len(previous_text):] if text.startswith(previous_text) else
                     tokenizer.decode([input_ids[t]], skip_special_tokens=False))
        previous_text = text
    return texts


def _write_html(path: Path, settings: dict, rows: list[dict], stats: list[GroupStats], metric: str, verdicts,
                comparison, draws, audit, audit_kind, answers, token_audit_table, plots: dict[str, Path], examples,
                eu_note: str) -> None:
    from .. import html_report as H

    headers, table_rows, bold = results_table(stats, metric)
    metric_name = metric.replace("exact_match_", "")
    sections = [H.section("Verdicts", H.bullets(verdicts))] if verdicts else []
    sections.append(H.section("Results", H.paragraph(
        "Mean ± sample standard deviation over seeds (and draws of the data, pooled, when there are several). "
        "Bold: the best method of its budget (highest mean "
        f"{metric_name} exact match, among two or more methods). Budget = r_sample x r_token, the nominal share "
        "of response tokens trained on; loss tokens % is the measured share. Wall time = scoring + training "
        "(evaluation excluded)."), H.table(headers, table_rows, bold=bold)))
    if comparison is not None:
        sections.append(H.section("Wins, ties and losses", H.paragraph(COMPARISON_NOTE), H.table(*comparison)))
    if draws is not None:
        sections.append(H.section("Draw by draw", H.paragraph(DRAWS_NOTE), H.table(*draws)))
    figures = [H.image(plots[name], caption) for name, caption in (
        ("accuracy_vs_budget", "Accuracy against the nominal budget (log scale); error bars: standard deviation "
                               "over seeds; dashed line: full data."),
        ("accuracy_vs_time", "Accuracy against wall time (scoring + training) per run."),
    ) if name in plots]
    if figures:
        sections.append(H.section("Plots", *figures))
    if audit is not None:
        sections.append(H.section("Pruning audit", H.paragraph(
            "Share of each ground-truth category's appearances in training steps that were not trained on "
            "(random pruning drops every category alike, about 1 - r_sample)."), H.table(*audit)))
    if audit_kind is not None:
        sections.append(H.section("Pruning audit per kind", H.paragraph(
            "The same per kind of record (metadata.kind, after its category)."), H.table(*audit_kind)))
    if token_audit_table is not None:
        sections.append(H.section("Token-level audit", H.paragraph(TOKEN_AUDIT_NOTE), H.table(*token_audit_table)))
    if answers is not None:
        sections.append(H.section("Answers: format compliance and accuracy per difficulty", H.paragraph(
            "Strict exact match per difficulty level of the evaluation questions (metadata.difficulty), and the "
            "share of answers that end in a #### N line, whatever N."), H.table(*answers)))
    eu = [H.image(p, name.removeprefix("eu_plane_")) for name, p in plots.items() if name.startswith("eu_plane_")]
    if eu:
        sections.append(H.section("What each method kept, on the EU plane", H.paragraph(eu_note), *eu))
    if examples:
        sections.append(H.section("Token pruning examples", H.paragraph(
            f"Q2 samples of the whole training set triaged at once with the base model's scores at "
            f"r_sample={examples[0].r_sample:g}; struck-through tokens are those Stage 2 prunes at "
            f"r_token={examples[0].r_token:g} (per-sample budget, base model's token perplexities). During "
            "training the same happens per batch, with the current weights."),
            *[H.token_example(e) for e in examples]))
    sections.append(H.section("Setup", H.details(
        f"{len(settings)} options", H.paragraph(_setup_note(rows, metric)),
        H.table(["option", "value"], [[k, str(v)] for k, v in sorted(settings.items())]))))
    H.write_report(path, "qtune benchmark report", sections)

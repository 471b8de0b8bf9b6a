"""What `qtune audit` writes into OUT: audit.json, audit.md and audit.html (with eu_plane.png and
drop_rates.png when plots are on), each atomically. Every text that comes from the data is
escaped: Markdown cells with `qtune.report.markdown_text`, HTML by `qtune.html_report`."""

from __future__ import annotations

from pathlib import Path

from .. import html_report as H
from ..io import write_json, write_text
from ..report import format_table, markdown_text
from .planting import KINDS, UNPLANTED_DEFECTIVE, UNTOUCHED

#: What the audit cannot show, said in every output.
NOT_A_REAL_DEFECT = (
    "A planted defect is not a real one. Real defects are subtler: a plausible answer with one wrong step, a "
    "near-miss, a half-right truncation, noise that looks like the rest of the data. A method that fails this "
    "audit (it drops planted defects no more often than untouched records) will not catch real noise either; a "
    "method that passes it has only shown that it sees gross defects. Passing is necessary, not sufficient.")
VERDICT_NOTE = (
    "+ after a share: dropped more often than untouched records (the 95% Newcombe interval of the difference lies "
    "above 0); -: less often (it lies below 0: worse than random); no mark: no difference the counts can show, as "
    "a random rule would do. Shares are over the records of each kind (n in the header).")
TOKEN_NOTE = (
    "Token rules at r_token, applied to every sample: the share of the planted tokens of corrupted answers (the "
    "changed numbers, or the replaced sentence) that lose their loss, against the other tokens of the same answers.")


def groups_of(result: dict) -> list[str]:
    """The groups a table shows: untouched, the planted kinds, and the unplanted defective records
    when the audit has them."""
    extra = [UNPLANTED_DEFECTIVE] if result["planted"].get(UNPLANTED_DEFECTIVE) else []
    return [UNTOUCHED, *KINDS, *extra]


def _cell(entry: dict, group: str) -> str:
    share = entry["drop_share"].get(group)
    if share is None:
        return "-"
    mark = {"more": " +", "less": " -"}.get(entry["verdict"].get(group), "")
    return f"{100 * share:.0f}%{mark}"


def share_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the drop-share table: one row per method, one column per group."""
    groups = groups_of(result)
    headers = ["method"] + [f"{g} (n={result['planted'].get(g, 0)})" for g in groups]
    rows = [[name] + [_cell(entry, g) for g in groups] for name, entry in result["methods"].items()]
    return headers, rows


def token_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["token rule", "planted tokens pruned", "other tokens pruned", "tokens (planted / other)", "verdict"]
    rows = []
    for name, entry in result["token_rules"].items():
        share, n = entry["pruned_share"], entry["n"]
        shares = [f"{100 * share[g]:.0f}%" if share.get(g) is not None else "-" for g in ("planted", "other")]
        rows.append([name, *shares, f"{n['planted']} / {n['other']}", entry["verdict"]["planted"]])
    return headers, rows


def settings_text(result: dict) -> str:
    s = result["settings"]
    planted = ", ".join(f"{k} {result['planted'].get(k, 0)}" for k in KINDS)
    return (f"{s['n_sample']} of the {s['n_records']} records of {s['data']} (seed {s['seed']}), scored once with "
            f"{s['model']}; {sum(result['planted'].get(k, 0) for k in KINDS)} planted into "
            f"{'clean records only' if s['plant_into'] == 'clean' else 'any record'} ({planted}). Sample rules and "
            f"Q-Tuning decide per batch of {s['batch_size']} at r_sample = {s['r_sample']:g}, selectors keep "
            f"r_sample of the whole sample, token rules keep r_token = {s['r_token']:g}.")


def write_markdown(path: Path, result: dict) -> None:
    parts = [f"# qtune audit: {markdown_text(result['settings']['data'])}", "", NOT_A_REAL_DEFECT, "",
             markdown_text(settings_text(result)), "", "## Verdicts", ""]
    parts += [f"- **{name}**: {entry['sentence']}" for name, entry in result["methods"].items()]
    parts += ["", "## Drop share per planted kind", "", VERDICT_NOTE, "", format_table(*share_rows(result))]
    if result["token_rules"]:
        parts += ["", "## Token rules", "", TOKEN_NOTE, ""]
        parts += [f"- **{name}**: {entry['sentence']}" for name, entry in result["token_rules"].items()]
        parts += ["", format_table(*token_rows(result))]
    if result["contamination"] is not None:
        c = result["contamination"]
        parts += ["", "## Contamination", "", markdown_text(c["summary"])]
        if c["pairs"]:
            parts += ["", format_table(["train record", "eval record", "how", "shared text"],
                                       [[p["train_id"], p["eval_id"], p["how"], markdown_text(p["shared"][:100])]
                                        for p in c["pairs"][:20]])]
    if result["skipped"]:
        parts += ["", "## Not audited", ""]
        parts += [f"- {name}: {markdown_text(why)}" for name, why in result["skipped"].items()]
    parts += ["", "See docs/audit.md for what each number means and the verdict rule."]
    write_text(path, "\n".join(parts) + "\n")


def write_figures(out: Path, result: dict, ppl: list[float], ent: list[float], groups: list[str],
                  thresholds: dict[str, float]) -> dict[str, Path]:
    """eu_plane.png (the sample by planted kind) and drop_rates.png (each method's drop share per
    group, random's untouched share as a line)."""
    from ..plotting import plot_drop_rates, plot_eu_plane_by_group

    figures = {"eu_plane": plot_eu_plane_by_group(out / "eu_plane.png", ppl, ent, groups, thresholds,
                                                  order=groups_of(result),
                                                  title="EU plane of the audited sample, by planted kind")}
    random_rule = result["methods"].get("rule:random")
    reference = None if random_rule is None else random_rule["drop_share"].get(UNTOUCHED)
    rates = {name: entry["drop_share"] for name, entry in result["methods"].items()}
    figures["drop_rates"] = plot_drop_rates(out / "drop_rates.png", rates, groups_of(result), reference,
                                            title="Share dropped per planted kind (dashed: the random rule's)")
    return figures


def write_html(path: Path, result: dict, figures: dict[str, Path]) -> None:
    sections = [H.section("What a planted defect is not", H.paragraph(NOT_A_REAL_DEFECT)),
                H.section("Settings", H.paragraph(settings_text(result))),
                H.section("Verdicts", H.table(["method", "verdict"],
                                              [[n, e["sentence"]] for n, e in result["methods"].items()]))]
    drop = [H.paragraph(VERDICT_NOTE), H.table(*share_rows(result))]
    if "drop_rates" in figures:
        drop.append(H.image(figures["drop_rates"], "Share of each planted kind dropped, per method"))
    sections.append(H.section("Drop share per planted kind", *drop))
    if "eu_plane" in figures:
        sections.append(H.section("EU plane", H.image(figures["eu_plane"], "The audited sample on the "
                                                      "Error-Uncertainty plane, coloured by planted kind")))
    if result["token_rules"]:
        sections.append(H.section("Token rules", H.paragraph(TOKEN_NOTE), H.table(*token_rows(result))))
    if result["contamination"] is not None:
        c = result["contamination"]
        sections.append(H.section("Contamination", H.paragraph(c["summary"]), H.table(
            ["train record", "eval record", "how", "shared text"],
            [[p["train_id"], p["eval_id"], p["how"], p["shared"][:100]] for p in c["pairs"][:20]])))
    if result["skipped"]:
        sections.append(H.section("Not audited", H.table(["name", "why"], list(result["skipped"].items()))))
    H.write_report(path, "qtune audit", sections)


def write_outputs(out: Path, result: dict, figures: dict[str, Path]) -> dict[str, Path]:
    """audit.json, audit.md, audit.html; returns their paths."""
    paths = {"json": out / "audit.json", "md": out / "audit.md", "html": out / "audit.html"}
    write_json(paths["json"], result)
    write_markdown(paths["md"], result)
    write_html(paths["html"], result, figures)
    return paths

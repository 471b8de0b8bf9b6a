"""Pool the `qtune audit` results of several planting seeds into one table (docs/audit.md, "Results").

Each method's dropped and total records of each group are summed over the seeds' audit.json files
and judged again with the audit's own rule (`qtune.audit.verdict.summarize`: the 95% Newcombe
interval of the difference with the untouched records); each cell also says in how many of the
seeds, audited alone, the same verdict came out. A method audited in only some seeds is pooled over
those, and the count says so.

    python bench/audit_seeds_report.py runs/audit-gsm8k-seed0 runs/audit-gsm8k-seed1 runs/audit-gsm8k-seed2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qtune.audit.outputs import groups_of
from qtune.audit.planting import UNTOUCHED
from qtune.audit.verdict import summarize
from qtune.report import format_table

MARK = {"more": " +", "less": " -"}


def pooled(results: list[dict], family: str, reference: str, share_key: str, **words) -> dict[str, dict]:
    """Per method of `family` ("methods" or "token_rules"): the summed counts judged again, and each
    seed's own verdicts (`by_seed`)."""
    names = list(dict.fromkeys(name for r in results for name in r[family]))
    out = {}
    for name in names:
        entries = [r[family][name] for r in results if name in r[family]]
        groups = list(dict.fromkeys(g for e in entries for g in e["n"]))
        counts = {g: (sum(e["hits"].get(g, 0) for e in entries), sum(e["n"].get(g, 0) for e in entries))
                  for g in groups}
        kinds = [g for g in groups if g != reference]
        out[name] = {**summarize(counts, kinds, reference, share_key=share_key, **words),
                     "by_seed": [e["verdict"] for e in entries]}
    return out


def cell(entry: dict, group: str, share_key: str) -> str:
    share = entry[share_key].get(group)
    if share is None:
        return "-"
    verdict = entry["verdict"].get(group)
    text = f"{100 * share:.0f}%{MARK.get(verdict, '')}"
    if verdict is not None:
        agree = sum(seed.get(group) == verdict for seed in entry["by_seed"])
        text += f" ({agree}/{len(entry['by_seed'])})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="audit output folders (each with its audit.json)")
    parser.add_argument("--out", help="also write the pooled result as JSON here")
    args = parser.parse_args()
    results = [json.loads((Path(f) / "audit.json").read_text(encoding="utf-8")) for f in args.folders]
    methods = pooled(results, "methods", UNTOUCHED, "drop_share")
    tokens = pooled(results, "token_rules", "other", "pruned_share", acts="prunes",
                    of_reference="the other tokens of the same answers",
                    words={"planted": "the planted tokens of corrupted answers"})
    groups = groups_of(results[0])
    n = {g: sum(r["planted"].get(g, 0) for r in results) for g in groups}
    seeds = ", ".join(str(r["settings"]["seed"]) for r in results)
    print(f"Pooled over planting seeds {seeds}: cell = pooled share dropped, + / - the pooled verdict "
          "(more / less often than untouched records), (k/s) = seeds whose own audit gave that verdict.\n")
    print(format_table(["method"] + [f"{g} (n={n[g]})" for g in groups],
                       [[name] + [cell(e, g, "drop_share") for g in groups] for name, e in methods.items()]))
    if tokens:
        print()
        print(format_table(["token rule", "planted tokens pruned", "other tokens pruned"],
                           [[name, cell(e, "planted", "pruned_share"), cell(e, "other", "pruned_share")]
                            for name, e in tokens.items()]))
    print()
    for name, e in methods.items():
        print(f"- **{name}**: {e['sentence']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": seeds, "methods": methods, "token_rules": tokens}, indent=1))


if __name__ == "__main__":
    main()

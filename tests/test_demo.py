"""What `qtune demo` prints at its end: results first, tables that fit a terminal, and where the
report and the kept Q-Tuning model are."""

import json
import random
import re

import pytest

from qtune.bench import Cell, summarize_results
from qtune.bench.stats import COLUMNS, results_table
from qtune.demo import DEMO_BUDGET, DEMO_METHODS, closing_text, kept_model_dir

#: The saturated testbed's categories and kinds (`qtune.testbed.saturated.CATEGORY_KINDS`).
KINDS = {"clean": ["clean"], "misconception": ["all_but"], "redundant": ["repeat", "renamed", "renumbered"],
         "teacher_error": ["wrong_operation", "intermediate_answer", "dropped_step"],
         "format": ["truncated", "answer_format", "off_task"], "swapped": ["swapped_answer"]}
#: Part A of the saturated grid (bench/configs/saturated-grid-a.yaml): the longest method names.
GRID_METHODS = ["full", "oracle", "random", "qtuning", "token_matched_random", "oracle_ratio", "anti_oracle",
                "random+perplexity", "longest+random", "longest+perplexity", "entropy+random", "entropy+perplexity",
                "infobatch+random", "infobatch+perplexity", "random+rho1", "random+token_cleaning",
                "oracle_ratio+random"]


def cell_row(rng, method, r_sample, r_token, seed):
    """A result row as a bench cell writes it, with values of the sizes a real run has (wall
    seconds in the thousands, every audit)."""
    free = method in ("full", "oracle")
    r_sample, r_token = (1.0, 1.0) if free else (r_sample, r_token)
    audit = {c: {"seen": 3000, "kept": 700, "dropped_share": rng.random()} for c in KINDS}
    kinds = {f"{c}/{k}": {"seen": 300, "kept": 70, "dropped_share": rng.random()}
             for c, ks in KINDS.items() for k in ks}
    scoring = rng.uniform(0, 900)
    training = rng.uniform(100, 2500)
    return {"cell": Cell(method, r_sample, r_token, seed).name, "method": method, "r_sample": r_sample,
            "r_token": r_token, "seed": seed, "nominal_budget": 1.0 if free else r_sample * r_token,
            "exact_match_strict": rng.random(), "exact_match_flexible": rng.random(), "perplexity": rng.uniform(1, 30),
            "loss_tokens": rng.randint(10_000, 2_000_000), "loss_token_fraction": rng.random(),
            "kept_sample_fraction": rng.random(), "scoring_seconds": scoring, "training_seconds": training,
            "wall_seconds": scoring + training, "cell_seconds": scoring + training + 60, "audit": audit,
            "audit_kind": kinds, "format_compliance": rng.random(), "accuracy_by_difficulty": {"1": 0.9, "2": 0.8}}


def write_results(out, methods, budgets, seeds):
    rng = random.Random(0)
    rows, done = [], set()
    for seed in seeds:
        for method in methods:
            for r_sample, r_token in budgets:
                row = cell_row(rng, method, r_sample, r_token, seed)
                if row["cell"] not in done:
                    done.add(row["cell"])
                    rows.append(row)
    (out / "compare").mkdir(parents=True)
    (out / "compare" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("methods, budgets, seeds", [
    (DEMO_METHODS.split(","), [(0.25, 0.5)], [0]),  # what the demo runs
    (GRID_METHODS, [(0.25, 0.5), (0.25, 0.7), (0.125, 0.5)], [0, 1, 2]),  # a large grid, 3 seeds
])
def test_the_demo_ends_with_verdicts_tables_within_100_columns_and_where_things_are(tmp_path, methods, budgets, seeds):
    rows = write_results(tmp_path, methods, budgets, seeds)
    model = kept_model_dir(tmp_path / "compare")
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 2_500_000)
    text = closing_text(tmp_path, "/testbed/test.jsonl")
    lines = text.splitlines()

    tables = [line for line in lines if line.startswith("|")]
    assert tables and max(map(len, tables)) <= 100
    # No number is cut: every mean ± std of the accuracy, token share and wall-time columns is there whole.
    stats = summarize_results(rows)
    headers, table, _ = results_table(stats, "exact_match_strict")
    shown = [headers.index(h) for _, h, *_ in COLUMNS if h in ("strict EM %", "loss tokens %", "kept samples %",
                                                               "wall s")]
    cells = {c.strip() for line in tables for c in line.split("|")}
    assert {row[i] for row in table for i in shown} <= cells
    # Results first: the verdict sentences (wrapped at 100 characters), then the tables.
    assert all(len(line) <= 100 for line in text.split("\n\n")[0].splitlines())
    verdicts = [" ".join(v.split()) for v in text.split("\n\n")[0].removeprefix("- ").split("\n- ")]
    assert all(v.startswith("qtuning at ") for v in verdicts)
    if seeds == [0]:
        assert [re.search(r"against (.+?):", v).group(1) for v in verdicts] == [
            "random", "full data", "the ceiling (oracle_ratio+random"]
        assert all("points (one seed: no standard deviation, so no verdict)." in v for v in verdicts)
    else:  # random, token-matched random, full data and the ceiling at each of qtuning's budgets
        assert len(verdicts) == 4 * len(budgets)
        assert all(re.search(r"(beats|ties with|loses to) .*points, [+-]\d+\.\d pooled std \((win|tie|loss)\)\.$", v)
                   for v in verdicts)

    tail = "\n".join(lines[lines.index("demo done."):]).replace(" \\\n      ", " ")  # the commands, unwrapped
    assert f"report:         {tmp_path / 'compare' / 'report.html'}" in tail
    assert f"Q-Tuning model: {model}\n                  (2.5 MB on disk; the other models were not kept)" in tail
    assert f"  qtune eval --model {model} --data /testbed/test.jsonl --out {tmp_path / 'eval-qtuning'}\n" in tail
    assert tail.endswith("  qtune bench --model MODEL --data TRAIN.jsonl --eval-data TEST.jsonl --out runs/mine "
                         f"--methods full,random,qtuning --budgets {DEMO_BUDGET} --seeds 0,1,2 --keep-models-of qtuning")
    assert all(len(line) <= 100 for line in lines[lines.index("demo done."):] if str(tmp_path) not in line)


def test_a_demo_whose_qtuning_cell_finished_without_its_model_says_so(tmp_path):
    write_results(tmp_path, DEMO_METHODS.split(","), [(0.25, 0.5)], [0])
    text = closing_text(tmp_path, "/testbed/test.jsonl")
    assert "Q-Tuning model: not kept: its cell finished in an earlier run" in text and "qtune eval" not in text

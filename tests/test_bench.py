"""The benchmark grid: grid flags, resume, interrupted cells, tables, the self-contained HTML report."""

import argparse
import csv
import dataclasses
import io
import json
import os
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import qtune.train
from qtune import bench, html_report
from qtune.bench import (BenchConfig, Cell, add_bench_parser, build_grid, markdown_results, parse_budgets,
                         parse_methods, parse_seeds, run_bench, summarize_results)
from qtune.bench.stats import verdict_sentences
from qtune.cli import main
from qtune.config import build_config
from qtune.errors import QTuneError
from qtune.io import claim_output_dir
from qtune.report import category_quadrant_table, markdown_text


@pytest.fixture(scope="module")
def tiny_bench_inputs(tmp_path_factory, tiny_model_dir):
    """The tiny test model, 32 training records (clean / noise / redundant) and 8 test records."""
    root = tmp_path_factory.mktemp("bench-inputs")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    rng = random.Random(0)

    def record(category=None):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        total = a + b + (7 if category == "noise" else 0)
        row = {"question": f"Tom has {a} apples and buys {b}. How many?",
               "answer": f"{a} + {b} = <<{a}+{b}={total}>>{total}.\n#### {total}"}
        return row | ({"metadata": {"category": category}} if category else {})

    (root / "train.jsonl").write_text("".join(json.dumps(record(("clean", "noise", "redundant")[i % 3])) + "\n"
                                              for i in range(32)))
    (root / "test.jsonl").write_text("".join(json.dumps(record()) + "\n" for _ in range(8)))
    return root


def bench_config(inputs: Path, out: Path, **overrides) -> BenchConfig:
    values = dict(out=str(out), model=str(inputs / "model"), data=str(inputs / "train.jsonl"),
                  eval_data=str(inputs / "test.jsonl"), methods="full,random,qtuning", budgets="0.5x0.5", seeds="0",
                  max_steps=2, batch_size=8, lr=1e-3, max_new_tokens=8, eval_limit=4, eval_batch_size=4,
                  max_length=128, examples=2)
    values.update(overrides)
    return BenchConfig(**values)


@pytest.fixture
def count_training(monkeypatch):
    """Counts the cells trained (run_train calls), by method."""
    calls = []
    real = qtune.train.run_train

    def counting(cfg):
        calls.append(cfg.method)
        return real(cfg)

    monkeypatch.setattr(qtune.train, "run_train", counting)
    return calls


class _Page(HTMLParser):
    """Tags, attributes and text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, name, value or "") for name, value in attrs]

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def assert_self_contained(page: _Page):
    sources = [value for tag, name, value in page.attrs if name in ("src", "href")]
    assert sources and all(v.startswith("data:image/png;base64,") for v in sources)
    assert not [a for a in page.attrs if "http://" in a[2] or "https://" in a[2]]
    assert "link" not in page.tags and "script" not in page.tags


# --- the grid ------------------------------------------------------------------------------------


def test_default_grid_runs_full_once_per_seed_and_every_other_method_per_budget():
    methods = parse_methods(None)
    assert methods[0] == "full" and {"random", "qtuning"} <= set(methods)
    cells = build_grid(methods, parse_budgets(bench.DEFAULT_BUDGETS), parse_seeds("0,1,2"))
    assert len(cells) == 3 * (1 + 6 * (len(methods) - 1))
    assert [c.name for c in cells if c.method == "full"] == ["full-seed0", "full-seed1", "full-seed2"]
    assert len({c.name for c in cells}) == len(cells)
    assert Cell("qtuning", 0.25, 0.7, 1).name == "qtuning-r0.25x0.7-seed1"


def test_grid_flags_narrow_the_grid_and_bad_values_are_one_line_errors(tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["bench", "--methods", "qtuning", "--budgets", "0.25x0.7,0.125x0.5", "--seeds", "1,2",
                            "--jobs", "2", "--max-new-tokens", "32", "--no-plots"])
    cfg = build_config(BenchConfig, ns, ns.config)
    assert (cfg.jobs, cfg.max_new_tokens, cfg.plots) == (2, 32, False)
    assert ns.func is bench._bench
    cells = build_grid(parse_methods(cfg.methods), parse_budgets(cfg.budgets), parse_seeds(cfg.seeds))
    assert [c.name for c in cells] == ["qtuning-r0.25x0.7-seed1", "qtuning-r0.125x0.5-seed1",
                                       "qtuning-r0.25x0.7-seed2", "qtuning-r0.125x0.5-seed2"]
    yaml_file = tmp_path / "bench.yaml"
    yaml_file.write_text("methods: full,random\nseeds: '0'\nlr: 0.001\n")
    ns = parser.parse_args(["bench", "--config", str(yaml_file), "--seeds", "3"])
    cfg = build_config(BenchConfig, ns, ns.config)
    assert (cfg.methods, cfg.seeds, cfg.lr) == ("full,random", "3", 0.001)
    for bad in ("0.25", "0x0.5", "0.5x1.5", "axb"):
        with pytest.raises(QTuneError, match="--budgets"):
            parse_budgets(bad)
    with pytest.raises(QTuneError, match="unknown method.*nope"):
        parse_methods("qtuning,nope")
    assert parse_methods("longest+perplexity,full") == ["full", "longest+perplexity"]
    with pytest.raises(QTuneError, match=r"unknown method\(s\) longest\+nope"):
        parse_methods("longest+nope")
    with pytest.raises(QTuneError, match="--seeds"):
        parse_seeds("1,x")


def test_oracle_runs_once_per_seed_and_token_matched_follows_qtuning_of_its_budget_and_seed(tmp_path):
    from qtune.bench.cells import train_config
    from qtune.methods import METHODS

    # Budget-free = the methods with no budget among their options; every matched source is registered.
    budget_fields = {"r_sample", "r_token"}
    assert set(bench.BUDGET_FREE) == {m for m, cls in METHODS.items()
                                      if not budget_fields & {f.name for f in dataclasses.fields(cls.config_class)}}
    assert set(bench.MATCHED.values()) <= set(METHODS) - set(bench.BUDGET_FREE)
    methods = parse_methods("token_matched_random,oracle,anti_oracle,qtuning,full")
    cells = build_grid(methods, [(0.25, 0.7), (0.125, 0.5)], [0, 1])
    names = [c.name for c in cells]
    assert names[:8] == ["full-seed0", "oracle-seed0", "anti_oracle-r0.25x0.7-seed0", "qtuning-r0.25x0.7-seed0",
                         "token_matched_random-r0.25x0.7-seed0", "anti_oracle-r0.125x0.5-seed0",
                         "qtuning-r0.125x0.5-seed0", "token_matched_random-r0.125x0.5-seed0"]
    assert len(cells) == 2 * (2 + 2 * 3) and len(set(names)) == len(names)
    assert [c.name for c in cells if c.method == "oracle"] == ["oracle-seed0", "oracle-seed1"]
    assert Cell("oracle", 1.0, 1.0, 1).label == "oracle seed=1"
    settings = dataclasses.asdict(BenchConfig(model="m", data="train.jsonl", eval_data="test.jsonl"))
    for cell in cells:
        cfg = train_config(cell, settings, tmp_path)
        assert cfg.out == str(tmp_path / "cells" / cell.name / "train")
        if cell.method != "token_matched_random":
            assert cell.source is None and cfg.match_run is None
            continue
        assert cell.source == Cell("qtuning", cell.r_sample, cell.r_token, cell.seed)
        assert names.index(cell.source.name) < names.index(cell.name)
        assert cfg.match_run == str(tmp_path / "cells" / cell.source.name / "train")
        assert (cfg.r_sample, cfg.seed, cfg.match_fraction) == (cell.r_sample, cell.seed, None)


def test_token_matched_without_qtuning_is_refused_and_fails_when_its_qtuning_cell_has_not_finished(tmp_path):
    with pytest.raises(QTuneError, match="token_matched_random keeps as many loss tokens as the qtuning cell.*"
                                         "needs qtuning in --methods"):
        build_grid(parse_methods("full,random,token_matched_random"), [(0.25, 0.7)], [0])
    settings = dataclasses.asdict(BenchConfig(model="m", data="train.jsonl", eval_data="test.jsonl"))
    with pytest.raises(QTuneError, match="cell qtuning-r0.25x0.7-seed0 did, which has not finished"):
        bench.run_cell(Cell("token_matched_random", 0.25, 0.7, 0), settings, tmp_path)


def test_with_jobs_a_token_matched_cell_starts_after_its_qtuning_cell_ended(tmp_path, monkeypatch, capsys):
    """The parallel scheduler, with threads for processes and a stand-in for the cells' work."""
    import concurrent.futures
    import threading
    import time

    from qtune.bench import cells as bench_cells

    class ThreadPool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, max_workers, mp_context=None, initializer=None, initargs=()):
            super().__init__(max_workers)

    events, lock = [], threading.Lock()

    labels = bench_cells.TrainingLabels(None, None, None)

    def fake_cell(cell, settings, out, keep_model, cell_labels):
        assert cell_labels is labels  # read once by the parent, handed to every cell
        with lock:
            events.append(("start", cell.name))
        time.sleep(0.05 if cell.method == "qtuning" else 0.0)
        with lock:
            events.append(("end", cell.name))
        if cell == Cell("qtuning", 0.5, 0.5, 1):
            return None, "boom in qtuning"
        return {"cell": cell.name, "exact_match_strict": 0.5, "cell_seconds": 1.0}, ""

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", ThreadPool)
    monkeypatch.setattr(bench_cells, "_run_cell_reporting_errors", fake_cell)
    monkeypatch.setattr(bench_cells, "training_labels", lambda settings: labels)
    cfg = BenchConfig(out=str(tmp_path), model="m", data="train.jsonl", eval_data="test.jsonl", jobs=2)
    grid = build_grid(parse_methods("qtuning,token_matched_random"), [(0.5, 0.5)], [0, 1])
    failures = bench_cells.run_cells(grid, cfg, tmp_path)
    assert failures == ["qtuning-r0.5x0.5-seed1"]
    assert len(events) == 8
    for seed in (0, 1):
        assert events.index(("end", f"qtuning-r0.5x0.5-seed{seed}")) < events.index(
            ("start", f"token_matched_random-r0.5x0.5-seed{seed}"))
    assert capsys.readouterr().out.count("[") == 4


def test_the_testbed_option_picks_the_preset_and_a_folder_keeps_its_preset(tmp_path, monkeypatch):
    import types

    import qtune.testbed
    from qtune.bench.results import check_settings, resolve_settings
    from qtune.errors import OptionError

    assert bench.TESTBED_PRESETS == tuple(qtune.testbed.PRESETS)
    assert BenchConfig().testbed == qtune.testbed.DEFAULT_PRESET
    with pytest.raises(OptionError, match="testbed must be one of data-starved, saturated"):
        BenchConfig(testbed="nope")
    built = []

    def fake_build_testbed(cache_dir=None, *, preset="data-starved", **_):
        built.append(preset)
        root = tmp_path / preset
        return types.SimpleNamespace(model_dir=root / "model", train_path=root / "train.jsonl",
                                     test_path=root / "test.jsonl")

    monkeypatch.setattr(qtune.testbed, "build_testbed", fake_build_testbed)
    settings = resolve_settings(BenchConfig(testbed="saturated", eval_data="mine.jsonl"))
    assert built == ["saturated"] and settings["testbed"] == "saturated"
    assert (settings["model"], settings["data"], settings["eval_data"]) == (
        str(tmp_path / "saturated" / "model"), str(tmp_path / "saturated" / "train.jsonl"), "mine.jsonl")
    resolve_settings(BenchConfig(testbed="saturated", model="m", data="d", eval_data="e"))
    assert built == ["saturated"]  # nothing to stand in for: no testbed built

    # bench.json: a run made before the option existed was made on the data-starved preset, the
    # only one then, not on today's default.
    old = resolve_settings(BenchConfig(model="m", data="d", eval_data="e", testbed="data-starved"))
    del old["testbed"]
    (tmp_path / "bench.json").write_text(json.dumps(old))
    check_settings(tmp_path, resolve_settings(BenchConfig(model="m", data="d", eval_data="e", testbed="data-starved")))
    with pytest.raises(QTuneError, match=r"other settings: testbed \('data-starved' before, 'saturated' now\)"):
        check_settings(tmp_path, resolve_settings(BenchConfig(model="m", data="d", eval_data="e")))


def test_draws_of_the_data_multiply_the_grid_and_draw_zero_keeps_its_names(tmp_path, monkeypatch):
    import types

    import qtune.testbed
    from qtune.bench.results import resolve_settings

    cells = build_grid(parse_methods("full,qtuning,token_matched_random"), [(0.25, 0.5)], [0, 1], [0, 2])
    assert [c.name for c in cells] == [
        "full-seed0", "qtuning-r0.25x0.5-seed0", "token_matched_random-r0.25x0.5-seed0",
        "full-seed1", "qtuning-r0.25x0.5-seed1", "token_matched_random-r0.25x0.5-seed1",
        "full-data2-seed0", "qtuning-r0.25x0.5-data2-seed0", "token_matched_random-r0.25x0.5-data2-seed0",
        "full-data2-seed1", "qtuning-r0.25x0.5-data2-seed1", "token_matched_random-r0.25x0.5-data2-seed1"]
    # A token-matched cell reads the qtuning cell of its own draw.
    assert cells[-1].source == Cell("qtuning", 0.25, 0.5, 1, 2) and cells[-1].source.name == cells[-2].name
    assert cells[-1].label == "token_matched_random r_sample=0.25 r_token=0.5 data_seed=2 seed=1"

    built = []

    def fake_build_testbed(cache_dir=None, *, preset="saturated", data_seed=None, **_):
        built.append((preset, data_seed))
        root = tmp_path / f"{preset}-{data_seed}"
        return types.SimpleNamespace(model_dir=root / "model", train_path=root / "train.jsonl",
                                     test_path=root / "test.jsonl")

    monkeypatch.setattr(qtune.testbed, "build_testbed", fake_build_testbed)
    cfg = BenchConfig(data_seeds="0,2")
    settings = resolve_settings(cfg)
    assert built == [("saturated", 0)] and resolve_settings(cfg, 0) == settings
    other = resolve_settings(cfg, 2)
    assert built[-1] == ("saturated", 2)
    assert {k: other[k] for k in ("model", "data", "eval_data")} == {
        "model": str(tmp_path / "saturated-2" / "model"), "data": str(tmp_path / "saturated-2" / "train.jsonl"),
        "eval_data": str(tmp_path / "saturated-2" / "test.jsonl")}
    assert {k: v for k, v in other.items() if k not in ("model", "data", "eval_data")} == {
        k: v for k, v in settings.items() if k not in ("model", "data", "eval_data")}
    # A model given by the user stays the model of every draw.
    mine = BenchConfig(data_seeds="0,2", model="mine")
    assert resolve_settings(mine, 2)["model"] == "mine"


def test_draws_need_the_testbeds_data(tiny_bench_inputs, tmp_path, count_training, capsys):
    out = tmp_path / "bench"
    base = ["bench", "--model", str(tiny_bench_inputs / "model"), "--data", str(tiny_bench_inputs / "train.jsonl"),
            "--eval-data", str(tiny_bench_inputs / "test.jsonl"), "--out", str(out)]
    assert main(base + ["--data-seeds", "0,1"]) == 2
    assert capsys.readouterr().err == ("error: --data-seeds draws the testbed's data again; with --data or "
                                       "--eval-data there is only your data: leave --data-seeds at 0\n")
    assert main(["bench", "--data-seeds", "0,-1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: --data-seeds: a draw of the data is a non-negative integer, not -1\n"
    assert main(["bench", "--data-seeds", "0,x", "--out", str(out)]) == 2
    assert "--data-seeds: '0,x' is not a comma-separated list of integers" in capsys.readouterr().err
    assert count_training == [] and not out.exists()


def test_draws_are_pooled_and_their_spread_is_split_from_the_seeds():
    def runs(method, r_sample, r_token, by_draw):
        return [result(method, r_sample, r_token, seed, v, data_seed=d)
                for d, values in by_draw.items() for seed, v in enumerate(values)]

    rows = (runs("full", 1.0, 1.0, {0: [0.90, 0.92, 0.94], 1: [0.90, 0.92, 0.94]})
            + runs("random", 0.25, 0.5, {0: [0.80, 0.81, 0.82], 1: [0.86, 0.87, 0.88]})
            # a clear win over random on draw 0, a tie on draw 1
            + runs("qtuning", 0.25, 0.5, {0: [0.86, 0.87, 0.88], 1: [0.86, 0.88, 0.90]}))
    stats = {g.method: g for g in summarize_results(rows)}
    q = stats["qtuning"]
    assert q.runs_label == "2x3" and q.data_seeds == [0, 0, 0, 1, 1, 1] and q.seeds == [0, 1, 2, 0, 1, 2]
    assert q.mean["exact_match_strict"] == pytest.approx(0.875)
    values = [0.86, 0.87, 0.88, 0.86, 0.88, 0.90]
    mean = sum(values) / 6
    assert q.std["exact_match_strict"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 5) ** 0.5)
    # across draws: the std of the draws' means 0.87 and 0.88; across seeds: sqrt of the mean of the
    # draws' variances 0.0001 and 0.0004
    assert q.draw_std == pytest.approx(0.01 / 2 ** 0.5)
    assert q.seed_std == pytest.approx(0.00025 ** 0.5)

    headers, table, _ = bench.stats.results_table(list(stats.values()), "exact_match_strict")
    assert headers[3] == "draws x seeds"
    at = headers.index("strict EM %")
    assert headers[at + 1:at + 3] == ["std across draws", "std across seeds"]
    qrow = next(r for r in table if r[0] == "qtuning")
    assert qrow[3] == "2x3" and qrow[at + 1:at + 3] == ["0.7", "1.6"]
    rows_csv = list(csv.DictReader(io.StringIO(bench.csv_results(list(stats.values())))))
    assert next(r for r in rows_csv if r["method"] == "qtuning")["data_seeds"] == "0 0 0 1 1 1"

    headers, table = bench.stats.draw_rows(rows, summarize_results(rows), "exact_match_strict")
    assert headers == ["method", "r_sample x r_token", "vs random, draw 0", "vs random, draw 1",
                       "vs full, draw 0", "vs full, draw 1"]
    by_method = {r[0]: r[2:] for r in table}
    # draw 0: +6 points, pooled std 1 -> +6.00, win; draw 1: +1 point, pooled std sqrt((4 + 1) / 2) = 1.58
    assert by_method["qtuning"][:2] == ["+6.0 (+6.00) win", "+1.0 (+0.63) tie"]
    # against full (std 2 points on both draws): -5 / sqrt((1 + 4) / 2) = -3.16; -4 / 2 = -2.00
    assert by_method["qtuning"][2:] == ["-5.0 (-3.16) loss", "-4.0 (-2.00) loss"]
    assert by_method["random"][:2] == ["-", "-"]
    draw_0 = [r for r in rows if r["data_seed"] == 0]
    assert bench.stats.draw_rows(draw_0, summarize_results(draw_0), "exact_match_strict") is None
    # one draw: the single-draw table, unchanged
    headers, table, _ = bench.stats.results_table(summarize_results(HAND_ROWS), "exact_match_strict")
    assert headers[3] == "seeds" and "std across draws" not in headers


# --- tables --------------------------------------------------------------------------------------


def result(method, r_sample, r_token, seed, strict, **extra):
    row = {"cell": Cell(method, r_sample, r_token, seed, extra.get("data_seed", 0)).name, "method": method, "r_sample": r_sample,
           "r_token": r_token, "seed": seed, "nominal_budget": 1.0 if method == "full" else r_sample * r_token,
           "exact_match_strict": strict, "exact_match_flexible": strict + 0.1, "perplexity": 3.0,
           "loss_token_fraction": 0.2, "kept_sample_fraction": 0.25, "scoring_seconds": 1.0,
           "training_seconds": 2.0, "wall_seconds": 3.0, "cell_seconds": 4.0, "audit": None}
    return row | extra


HAND_ROWS = (
    [result("qtuning", 0.25, 0.7, s, v) for s, v in enumerate([0.4, 0.5, 0.6])]
    + [result("random", 0.25, 0.7, s, v) for s, v in enumerate([0.3, 0.3, 0.3])]
    + [result("full", 1.0, 1.0, 0, 0.7)]
    + [result("random", 0.5, 0.5, 0, 0.45)]  # a budget with one method: nothing to compare
)


def test_summary_has_mean_and_sample_std_over_seeds_and_marks_the_best_of_each_budget():
    stats = {(g.method, g.r_sample, g.r_token): g for g in summarize_results(HAND_ROWS)}
    q, r, full = stats["qtuning", 0.25, 0.7], stats["random", 0.25, 0.7], stats["full", 1.0, 1.0]
    assert q.mean["exact_match_strict"] == pytest.approx(0.5)
    assert q.std["exact_match_strict"] == pytest.approx(0.1)  # sample std (n - 1)
    assert r.std["exact_match_strict"] == pytest.approx(0.0)
    assert full.std["exact_match_strict"] is None and full.seeds == [0]
    assert (q.best, r.best, full.best, stats["random", 0.5, 0.5].best) == (True, False, False, False)
    # A control bounds the methods and is never the best of its budget, however high it scores.
    ceiling = [result("oracle_ratio+random", 0.25, 0.7, s, 0.9) for s in range(3)]
    with_ceiling = {g.method: g.best for g in summarize_results([*HAND_ROWS, *ceiling]) if g.r_sample == 0.25}
    assert with_ceiling == {"qtuning": True, "random": False, "oracle_ratio+random": False}
    # ranked by the flexible metric, the best can change
    flexible = {(g.method, g.r_sample): g.best for g in summarize_results(
        [*HAND_ROWS[:3], *[result("random", 0.25, 0.7, s, 0.3, exact_match_flexible=0.9) for s in range(3)]],
        "exact_match_flexible")}
    assert flexible == {("qtuning", 0.25): False, ("random", 0.25): True}

    table = markdown_results(summarize_results(HAND_ROWS), "exact_match_strict")
    lines = table.splitlines()
    assert lines[2].startswith("| full") and "70.0" in lines[2]  # full data first, as its own row
    assert "**50.0 ± 10.0**" in table and "30.0 ± 0.0" in table and "**30.0" not in table
    rows = list(csv.DictReader(io.StringIO(bench.csv_results(summarize_results(HAND_ROWS)))))
    best = {(r["method"], r["r_sample"]): r["best"] for r in rows}
    assert best == {("full", "1.0"): "0", ("qtuning", "0.25"): "1", ("random", "0.25"): "0", ("random", "0.5"): "0"}
    qrow = next(r for r in rows if r["method"] == "qtuning")
    assert float(qrow["exact_match_strict_mean"]) == pytest.approx(0.5)
    assert float(qrow["exact_match_strict_std"]) == pytest.approx(0.1)


def test_comparison_gives_differences_in_pooled_std_and_a_verdict_per_budget():
    def seeds(method, r_sample, r_token, values, wall):
        return [result(method, r_sample, r_token, s, v, wall_seconds=wall) for s, v in enumerate(values)]

    rows = (seeds("full", 1.0, 1.0, [0.70, 0.72, 0.74], 10.0)
            + seeds("qtuning", 0.25, 0.7, [0.4, 0.5, 0.6], 5.0) + seeds("random", 0.25, 0.7, [0.30, 0.32, 0.34], 2.0)
            + seeds("qtuning", 0.5, 0.5, [0.45, 0.50, 0.55], 8.0) + seeds("random", 0.5, 0.5, [0.45, 0.47, 0.49], 4.0)
            + seeds("qtuning", 0.125, 0.5, [0.2], 4.0) + seeds("random", 0.125, 0.5, [0.1], 1.0))
    headers, table = bench.comparison_rows(summarize_results(rows), "exact_match_strict")
    assert headers[2:5] == ["vs random (pp)", "in std", "verdict"]
    by_cell = {(r[0], r[1]): r[2:] for r in table}
    # +18 pp; pooled std sqrt((10^2 + 2^2) / 2) = 7.21 pp -> 2.50; against full -22 pp -> -3.05
    assert by_cell["qtuning", "0.25x0.7"] == ["+18.0", "+2.50", "win", "-22.0", "-3.05", "loss", "0.50x"]
    # +3 pp; pooled std sqrt((5^2 + 2^2) / 2) = 3.81 pp -> 0.79: inside one std, a tie
    assert by_cell["qtuning", "0.5x0.5"][:3] == ["+3.0", "+0.79", "tie"]
    assert by_cell["random", "0.5x0.5"][:3] == ["-", "-", "-"] and by_cell["random", "0.5x0.5"][5] == "loss"
    assert by_cell["qtuning", "0.125x0.5"][:3] == ["+10.0", "-", "one seed"]
    assert ("full", "full data") not in by_cell
    assert bench.comparison_rows(summarize_results(seeds("full", 1.0, 1.0, [0.7], 1.0)), "exact_match_strict") is None

    # The same in words, for the primary method (qtuning), budgets from the largest down, with the ceiling
    # at its budget where it ran.
    ceiling = seeds("oracle_ratio+random", 0.25, 0.7, [0.8, 0.9, 1.0], 3.0)
    assert verdict_sentences(summarize_results(rows + ceiling), "exact_match_strict") == [
        "qtuning at 0.5x0.5 ties with random: 50.0% against 47.0%, +3.0 points, +0.8 pooled std (tie).",
        "qtuning at 0.5x0.5 loses to full data: 50.0% against 72.0%, -22.0 points, -5.8 pooled std (loss).",
        "qtuning at 0.25x0.7 beats random: 50.0% against 32.0%, +18.0 points, +2.5 pooled std (win).",
        "qtuning at 0.25x0.7 loses to full data: 50.0% against 72.0%, -22.0 points, -3.1 pooled std (loss).",
        "qtuning at 0.25x0.7 loses to the ceiling (oracle_ratio+random: clean samples first): 50.0% against "
        "90.0%, -40.0 points, -4.0 pooled std (loss).",
        "qtuning at 0.125x0.5 against random: 20.0% against 10.0%, +10.0 points (one seed: no standard deviation, "
        "so no verdict).",
        "qtuning at 0.125x0.5 against full data: 20.0% against 72.0%, -52.0 points (one seed: no standard "
        "deviation, so no verdict).",
    ]


def test_oracle_is_a_budget_free_row_compared_with_full_data_only(tmp_path):
    rows = HAND_ROWS + [result("oracle", 1.0, 1.0, s, v, nominal_budget=0.75) for s, v in enumerate([0.8, 0.9])]
    stats = summarize_results(rows)
    assert [(g.method, g.budget_label) for g in stats][:2] == [("full", "full data"), ("oracle", "clean data")]
    assert not stats[1].best  # the best of a budget is among the budgeted methods only
    headers, table = bench.comparison_rows(stats, "exact_match_strict")
    oracle = next(r for r in table if r[0] == "oracle")
    assert oracle[1] == "clean data" and oracle[2:5] == ["-", "-", "-"] and oracle[5] == "+15.0"
    markdown = markdown_results(stats, "exact_match_strict")
    oracle_line = next(line for line in markdown.splitlines() if line.startswith("| oracle"))
    assert [c.strip() for c in oracle_line.split("|")[1:5]] == ["oracle", "0.75", "clean data", "2"]

    # The audit per kind, when the rows have one.
    (tmp_path / "bench.json").write_text(json.dumps({"model": "m", "data": "d"}))
    kinds = {"noise/wrong_final": {"seen": 4, "kept": 0, "dropped_share": 1.0},
             "clean/clean": {"seen": 8, "kept": 6, "dropped_share": 0.25}}
    tokens = {"noise/wrong_final": {"appearances": 4, "final_kept": 0.25, "other_kept": 0.5}}
    answers = {"format_compliance": 0.9, "accuracy_by_difficulty": {"1": 0.5}}
    (tmp_path / "results.jsonl").write_text("".join(
        json.dumps(r | {"audit_kind": kinds, "audit_tokens": tokens} | answers) + "\n" for r in rows))
    run_bench(BenchConfig(out=str(tmp_path), report_only=True, plots=False))
    markdown = (tmp_path / "results.md").read_text()
    section = markdown.split("## Pruning audit per kind")[1]
    assert "dropped clean/clean %" in section and "dropped noise/wrong\\_final %" in section
    oracle_line = next(line for line in section.splitlines() if line.startswith("| oracle"))
    assert [c.strip() for c in oracle_line.split("|")[1:5]] == ["oracle", "clean data", "25.0 ± 0.0", "100.0 ± 0.0"]
    html = "".join(parse_page(tmp_path / "report.html").text)
    for title in ("Pruning audit per kind", "Token-level audit", "Answers: format compliance"):
        assert title in html
    # HTML tables take the raw names (the page escapes them), Markdown the escaped ones.
    assert "noise/wrong_final final/other %" in html and "25/50" in html
    assert "noise/wrong\\_final final/other %" in markdown and "difficulty 1 %" in markdown


def test_report_only_rebuilds_tables_and_html_from_results_jsonl(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"model": "m", "data": "d"}))
    audit = {"clean": {"seen": 8, "kept": 2, "dropped_share": 0.75}, "noise": {"seen": 4, "kept": 0,
                                                                                 "dropped_share": 1.0}}
    rows = [r | {"audit": audit} for r in HAND_ROWS]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cell": "cut sh')
    run_bench(BenchConfig(out=str(tmp_path), report_only=True, plots=False))
    markdown = (tmp_path / "results.md").read_text()
    assert "**50.0 ± 10.0**" in markdown and "dropped noise %" in markdown and "100.0 ± 0.0" in markdown
    assert "## Wins, ties and losses" in markdown
    # Results first: the verdict sentences, the table, the comparisons, the audit; the setup last.
    titles = [line for line in markdown.splitlines() if line.startswith("#")]
    assert titles == ["# Benchmark results", "## Results", "## Wins, ties and losses",
                      "## Pruning audit (dropped share per category)", "## Setup"]
    assert markdown.split("## Results")[0].splitlines()[2:4] == [
        "- qtuning at 0.25x0.7 beats random: 50.0% against 30.0%, +20.0 points, +2.8 pooled std (win).",
        "- qtuning at 0.25x0.7 against full data: 50.0% against 70.0%, -20.0 points (one seed: no standard "
        "deviation, so no verdict)."]
    assert "| model  |     m |" in markdown.split("## Setup")[1]
    page = parse_page(tmp_path / "report.html")
    best = [v for tag, name, v in page.attrs if tag == "td" and name == "class"]
    assert best == ["best"] and "table" in page.tags and "Wins, ties and losses" in "".join(page.text)
    html = (tmp_path / "report.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    assert headings[:3] == ["Verdicts", "Results", "Wins, ties and losses"] and headings[-1] == "Setup"
    assert re.search(r"<h2>Setup</h2><details><summary>2 options</summary>.*<td>model</td><td>m</td>", html)
    with pytest.raises(QTuneError, match="holds no bench run"):
        run_bench(BenchConfig(out=str(tmp_path / "empty"), report_only=True))


def test_markdown_reports_escape_category_names_from_the_data(tmp_path):
    assert markdown_text("a|b <x> `c` *d* _e_ [f] \\ & ~g\nh") == r"a\|b \<x\> \`c\` \*d\* \_e\_ \[f\] \\ \& \~g h"
    (tmp_path / "bench.json").write_text(json.dumps({"model": "m", "data": "d"}))
    audit = {"a|b <x>": {"seen": 8, "kept": 2, "dropped_share": 0.75},
             "clean": {"seen": 4, "kept": 0, "dropped_share": 1.0}}
    rows = [r | {"audit": audit} for r in HAND_ROWS]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_bench(BenchConfig(out=str(tmp_path), report_only=True, plots=False))
    markdown = (tmp_path / "results.md").read_text()
    section = markdown.split("## Pruning audit")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert "| dropped a\\|b \\<x\\> % |" in table[0] and "a|b" not in markdown
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1  # no row has an extra column
    assert "dropped a|b <x> %" in "".join(parse_page(tmp_path / "report.html").text)  # HTML escapes by itself
    summary = category_quadrant_table(["a|b <x>", "clean"], [1, 2])  # qtune score's summary.md
    assert "| a\\|b \\<x\\> |" in summary and "a|b" not in summary


def test_html_report_embeds_images_and_strikes_pruned_tokens(tmp_path):
    from qtune.plotting import plot_accuracy_vs_budget

    png = plot_accuracy_vs_budget(tmp_path / "p.png", {"qtuning": [(0.1, 40.0, 2.0), (0.2, 45.0, None)]}, (50.0, 1.0))
    example = html_report.TokenExample(sample_id=3, category="noise", prompt="What is 2 + <2>?",
                                       tokens=[("2 + 2", True, 1.5), (" = 5", False, 90.0), ("</s>", True, 2.0)],
                                       ppl=4.0, ent=0.5, r_sample=0.25, r_token=0.7)
    path = html_report.write_report(tmp_path / "r.html", "T & <title>", [
        html_report.section("S", html_report.table(["a", "b"], [["x", "<1>"]], bold={(0, 1)}),
                            html_report.image(png, "cap")),
        html_report.section("E", html_report.token_example(example)),
    ])
    page = parse_page(path)
    assert_self_contained(page)
    assert page.tags.count("s") == 1 and page.tags.count("img") == 1
    text = "".join(page.text)
    assert "What is 2 + <2>?" in text and " = 5" in text and "</s>" in text and "T & <title>" in text


# --- running the grid ----------------------------------------------------------------------------


def test_bench_runs_the_grid_resumes_and_reruns_an_interrupted_cell(tiny_bench_inputs, tmp_path, count_training,
                                                                     capsys):
    out = tmp_path / "bench"
    cfg = bench_config(tiny_bench_inputs, out, methods="full,qtuning")
    run_bench(cfg)
    assert count_training == ["full", "qtuning"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] full seed=0 ... acc ") and lines[0].endswith(" s")
    assert lines[1].startswith("[2/2] qtuning r_sample=0.5 r_token=0.5 seed=0 ... acc ")

    rows = {r["cell"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"full-seed0", "qtuning-r0.5x0.5-seed0"}
    q = rows["qtuning-r0.5x0.5-seed0"]
    assert q == json.loads((out / "cells" / q["cell"] / "result.json").read_text())
    assert q["steps"] == 2 and q["kept_sample_fraction"] == 0.5  # 2 steps of 8, half kept
    assert 0 < q["loss_tokens"] < q["response_tokens"] and q["n_eval"] == 4
    assert q["wall_seconds"] == pytest.approx(q["scoring_seconds"] + q["training_seconds"])
    assert q["phase_seconds"]["score"] > 0 and "score" not in rows["full-seed0"]["phase_seconds"]
    markdown = (out / "results.md").read_text()
    phase_table = markdown[markdown.index("## Time per phase"):]
    assert "token_select s" in phase_table.splitlines()[2]  # the header row, after the title and a blank line
    assert any(line.startswith("| qtuning ") for line in phase_table.splitlines())
    assert set(q["audit"]) == {"clean", "noise", "redundant"}
    assert sum(a["seen"] for a in q["audit"].values()) == 16
    assert rows["full-seed0"]["audit"]["noise"]["dropped_share"] == 0.0
    assert not (out / "cells" / q["cell"] / "train" / "model").exists()  # deleted once evaluated
    assert not list((out / "cells" / q["cell"] / "train").glob("checkpoint-*"))

    for name in ("results.md", "results.csv", "plots/accuracy_vs_budget.png", "plots/accuracy_vs_time.png",
                 "plots/eu_plane_qtuning.png"):
        assert (out / name).stat().st_size > 0, name
    page = parse_page(out / "report.html")
    assert_self_contained(page)
    assert "table" in page.tags and page.tags.count("img") == 3 and page.tags.count("s") > 0

    # A second run recomputes nothing.
    finished = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/result.json")}
    count_training.clear()
    cfg.plots = False  # a report option: it does not change the cells, and saves time here
    run_bench(cfg)
    assert count_training == []
    printed = capsys.readouterr().out
    assert "[1/2] full seed=0 ... done earlier" in printed and "[2/2] qtuning" in printed
    assert {p: p.stat().st_mtime_ns for p in finished} == finished

    # A cell folder without result.json (killed mid-cell) is cleaned and run again, and only it.
    interrupted = out / "cells" / "qtuning-r0.5x0.5-seed0"
    (interrupted / "result.json").unlink()
    (interrupted / "partial.bin").write_bytes(b"x")
    run_bench(cfg)
    assert count_training == ["qtuning"]
    assert (interrupted / "result.json").exists() and not (interrupted / "partial.bin").exists()
    assert len((out / "results.jsonl").read_text().splitlines()) == 2

    # Other training settings into the same folder are refused before anything runs.
    with pytest.raises(QTuneError, match=r"other settings: lr \(0.001 before, 0.002 now\)"):
        run_bench(bench_config(tiny_bench_inputs, out, methods="full,qtuning", lr=2e-3))
    # Narrowing the grid reuses the finished cells.
    count_training.clear()
    run_bench(bench_config(tiny_bench_inputs, out, methods="qtuning", plots=False))
    assert count_training == []
    with pytest.raises(QTuneError, match="other settings"):
        run_bench(bench_config(tiny_bench_inputs, out, methods="qtuning", max_new_tokens=9))
    # A run made before an option existed counts as made with its default.
    settings = json.loads((out / "bench.json").read_text())
    del settings["triage_start"]
    (out / "bench.json").write_text(json.dumps(settings))
    run_bench(bench_config(tiny_bench_inputs, out, methods="qtuning", plots=False))
    assert count_training == []
    with pytest.raises(QTuneError, match=r"triage_start \(0.0 before, 0.2 now\)"):
        run_bench(bench_config(tiny_bench_inputs, out, methods="qtuning", triage_start=0.2))


def test_a_failing_cell_is_reported_and_the_others_still_run(tiny_bench_inputs, tmp_path, monkeypatch, capsys):
    real = qtune.train.run_train

    def failing_for_random(cfg):
        if cfg.method == "random":
            raise RuntimeError("boom in random")
        return real(cfg)

    monkeypatch.setattr(qtune.train, "run_train", failing_for_random)
    out = tmp_path / "bench"
    with pytest.raises(QTuneError, match=r"1 cell\(s\) failed: random-r0.5x0.5-seed0"):
        run_bench(bench_config(tiny_bench_inputs, out, methods="full,random", plots=False))
    assert "random r_sample=0.5 r_token=0.5 seed=0 ... FAILED: boom in random" in capsys.readouterr().out
    assert "RuntimeError: boom in random" in (out / "cells" / "random-r0.5x0.5-seed0" / "cell.log").read_text()
    assert not (out / "cells" / "random-r0.5x0.5-seed0" / "result.json").exists()
    assert [json.loads(line)["cell"] for line in (out / "results.jsonl").read_text().splitlines()] == ["full-seed0"]
    assert (out / "report.html").exists()


def test_keep_models_of_keeps_one_methods_model_only_and_it_loads(tiny_bench_inputs, tmp_path):
    out = tmp_path / "bench"
    run_bench(bench_config(tiny_bench_inputs, out, methods="full,random,qtuning", keep_models_of="qtuning",
                           plots=False))
    kept = sorted(p.relative_to(out).as_posix() for p in out.glob("cells/*/train/model"))
    assert kept == ["cells/qtuning-r0.5x0.5-seed0/train/model"]
    assert len(list(out.glob("cells/*/result.json"))) == 3
    # What the demo prints next: `qtune eval --model <that folder> --data <test set>`.
    assert main(["eval", "--model", str(out / kept[0]), "--data", str(tiny_bench_inputs / "test.jsonl"),
                 "--out", str(tmp_path / "eval"), "--limit", "2", "--max-new-tokens", "4", "--no-perplexity"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 2


@pytest.mark.slow
def test_parallel_jobs_run_every_cell(tiny_bench_inputs, tmp_path, capsys):
    out = tmp_path / "bench"
    run_bench(bench_config(tiny_bench_inputs, out, methods="full,qtuning", jobs=2, plots=False))
    assert sorted(p.parent.name for p in (out / "cells").glob("*/result.json")) == [
        "full-seed0", "qtuning-r0.5x0.5-seed0"]
    progress = capsys.readouterr().out
    assert "[1/2]" in progress and "[2/2]" in progress


def test_controls_run_in_a_grid_on_labelled_data(tiny_bench_inputs, tmp_path, count_training):
    """oracle once, token_matched_random matching the qtuning cell it follows, audit per kind."""
    records = [json.loads(line) for line in (tiny_bench_inputs / "train.jsonl").read_text().splitlines()]
    for i, r in enumerate(records):
        r["metadata"] |= {"kind": f"k{i % 2}", "defective": r["metadata"]["category"] == "noise"}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "bench"
    run_bench(bench_config(tiny_bench_inputs, out, data=str(data), methods="token_matched_random,qtuning,oracle",
                           plots=False))
    assert count_training == ["oracle", "qtuning", "token_matched_random"]
    rows = {r["cell"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"oracle-seed0", "qtuning-r0.5x0.5-seed0", "token_matched_random-r0.5x0.5-seed0"}
    oracle, q, t = rows.values()
    assert (oracle["r_sample"], oracle["r_token"]) == (1.0, 1.0) and oracle["audit"]["noise"]["dropped_share"] == 1.0
    assert t["nominal_budget"] == pytest.approx(q["loss_token_fraction"])
    assert abs(t["loss_tokens"] - q["loss_tokens"]) <= t["steps"]  # up to rounding, half a token per step
    assert set(q["audit_kind"]) == {f"{c}/k{k}" for c in ("clean", "noise", "redundant") for k in (0, 1)}
    assert "clean data" in (out / "results.md").read_text()
    # The token-level audit: the oracle trains every token of what it keeps, and keeps no noise.
    assert set(oracle["audit_tokens"]) == {f"{c}/k{k}" for c in ("clean", "redundant") for k in (0, 1)}
    assert all(a["other_kept"] == 1.0 and a["final_kept"] in (1.0, None) for a in oracle["audit_tokens"].values())
    assert all(0 < a["other_kept"] < 1 for a in t["audit_tokens"].values() if a["other_kept"] is not None)
    assert 0 <= q["format_compliance"] <= 1 and q["accuracy_by_difficulty"] is None  # no difficulty in the data
    markdown = (out / "results.md").read_text()
    assert "## Token-level audit" in markdown and "## Answers: format compliance" in markdown


def test_an_invalid_option_fails_the_bench_before_any_cell_runs(tiny_bench_inputs, tmp_path, count_training, capsys):
    out = tmp_path / "bench"
    base = ["bench", "--out", str(out), "--model", str(tiny_bench_inputs / "model"),
            "--data", str(tiny_bench_inputs / "train.jsonl"), "--eval-data", str(tiny_bench_inputs / "test.jsonl"),
            "--methods", "full,random", "--budgets", "0.5x0.5", "--max-steps", "1", "--no-plots"]
    for flags, message in ((["--lr", "-1"], "--lr must be greater than 0; got -1.0"),
                           (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
                           (["--epochs", "0", "--max-steps", "-1"],
                            "--epochs must be greater than 0 unless max_steps is at least 1; got 0.0"),
                           (["--methods", "full,nope"], "--methods: unknown method(s) nope; available: a registered "
                                                        "method: anti_oracle, full, oracle, oracle_ratio, qtuning, "
                                                        "random, token_matched_random; or SAMPLE+TOKEN with SAMPLE one "
                                                        "of anti_oracle, entropy, infobatch, infobatch_exact, longest, "
                                                        "oracle_ratio, perplexity, random, shortest, uds and TOKEN "
                                                        "one of all, attention, perplexity, random, rho1, "
                                                        "token_cleaning"),
                           (["--keep-models-of", "qtuning"],
                            "--keep-models-of: qtuning is not among the methods run (full, random)"),
                           (["--methods", "random,token_matched_random"],
                            "--methods: token_matched_random keeps as many loss tokens as the qtuning cell of the same "
                            "budget and seed did, so it needs qtuning in --methods too (finished qtuning cells are "
                            "reused, not run again)")):
        assert main(base + flags) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
        assert not out.exists()
    # A value that only the cells' own configs check (here a seed) fails once, before the first cell.
    assert main(base + ["--seeds", "0,-1"]) == 2
    assert capsys.readouterr().err == "error: cell full-seed-1: seed must be in [0, 4294967295]; got -1\n"
    assert count_training == [] and not (out / "cells").exists()


def test_a_second_bench_on_the_same_folder_is_refused(tiny_bench_inputs, tmp_path, count_training, capsys):
    out = tmp_path / "bench"
    with claim_output_dir(out, "qtune bench"):  # a first bench, still running
        with pytest.raises(QTuneError, match=f"is in use by process {os.getpid()} qtune bench"):
            run_bench(bench_config(tiny_bench_inputs, out, methods="full"))
        with pytest.raises(QTuneError, match=f"is in use by process {os.getpid()} qtune bench"):
            run_bench(BenchConfig(out=str(out), report_only=True))
    assert count_training == [] and not (out / "cells").exists()


def test_response_token_roles_mark_the_last_line_and_leave_special_tokens_out():
    from qtune.report import response_token_roles

    pieces = ["He", " has", " 9", ".", "\n", "####", " 9", ""]  # "" is the end-of-turn token
    assert response_token_roles(pieces) == "oooooffs"
    assert response_token_roles(["no", " break", ""]) == "ffs"  # one line: all of it is the last line
    assert response_token_roles(["a", ".\n", "b", "\n"]) == "oooo"  # ends with a break: no last line


def test_token_audit_counts_final_line_and_other_tokens_of_trained_appearances():
    from qtune.report import token_audit

    roles = {0: "ooffs", 1: "offs", 2: "off"}
    group_of = {0: "clean", 1: "noise", 2: "noise"}
    steps = [{"kept_token_masks": {"0": "11001", "1": "1101"}},
             {"kept_token_masks": {"1": "0111", "2": "1"}},  # sample 2: length differs, not counted
             {"sample_ids": [0]}]  # a step without masks (logged before they were) counts nothing
    audit = token_audit(steps, group_of, roles)
    assert audit == {"clean": {"appearances": 1, "final_kept": 0.0, "other_kept": 1.0},
                     "noise": {"appearances": 2, "final_kept": 0.75, "other_kept": 0.5}}


def test_accuracy_by_groups_the_predictions_by_a_metadata_field():
    from qtune.report import accuracy_by

    predictions = [{"difficulty": 1, "correct_strict": True}, {"difficulty": 1, "correct_strict": False},
                   {"difficulty": 3, "correct_strict": True}, {"correct_strict": False}]
    assert accuracy_by(predictions, "difficulty") == {"1": 0.5, "3": 1.0}
    assert accuracy_by(predictions, "level") is None


def test_answer_and_token_audit_tables_average_over_seeds():
    from qtune.bench.stats import answer_rows, summarize_results, token_audit_rows

    rows = [r | {"format_compliance": f, "accuracy_by_difficulty": {"1": a, "2": 0.5},
                 "audit_tokens": {"noise/k0": {"appearances": 3, "final_kept": fk, "other_kept": 0.5}}}
            for r, f, a, fk in zip(HAND_ROWS, [1.0, 0.5] * 10, [0.2, 0.4] * 10, [0.1, 0.3] * 10)]
    stats = summarize_results(rows)
    headers, table = answer_rows(rows, stats)
    assert headers == ["method", "r_sample x r_token", "format %", "difficulty 1 %", "difficulty 2 %"]
    headers, table = token_audit_rows(rows, stats)
    assert headers[-1] == "noise/k0 final/other %"
    assert len(table) == len(stats)
    qtuning = next(row for row in table if row[0] == "qtuning")  # seeds: final shares 0.1, 0.3, 0.1
    assert qtuning[2] == "17/50"
    headers, table = answer_rows(rows, stats)
    qtuning = next(row for row in table if row[0] == "qtuning")  # format 1.0, 0.5, 1.0; level 1: 0.2, 0.4, 0.2
    assert qtuning[2].startswith("83.3") and qtuning[3].startswith("26.7") and qtuning[4].startswith("50.0")
    assert answer_rows(HAND_ROWS, stats) is None and token_audit_rows(HAND_ROWS, stats) is None

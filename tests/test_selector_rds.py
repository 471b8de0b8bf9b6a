"""The `rds` selector (RDS+): the position-weighted mean pool, the per-task max cosine and the
round-robin over tasks on hand-computed cases, the model pass against a sample-by-sample
computation, and the whole selector on the tiny model against a direct computation."""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from test_train import tiny_run_inputs  # noqa: F401 (a fixture)

from qtune.config import SelectConfig
from qtune.errors import QTuneError
from qtune.pruning import keep_count
from qtune.selection import load_target, run_select
from qtune.selectors import SELECTORS, SelectorInputs, keep_top, rds
from qtune.selectors.rds import pooled_hidden_states, round_robin, task_scores, weighted_mean_pool
from qtune.workflows import load_for_scoring


def test_weighted_mean_pool_weighs_the_ith_attended_token_by_i_and_ignores_padding():
    """Row 0, right-padded (3 tokens): weights 1/6, 2/6, 3/6 of [1, 0], [0, 1], [2, 2] give
    [(1 + 6) / 6, (2 + 6) / 6] = [7/6, 8/6]; the pad's [100, 100] has weight 0. Row 1,
    left-padded (2 tokens): weights 1/3, 2/3 of [3, 0], [0, 3] give [1, 2]. Row 2: one token, itself.
    Row 3: no attended token, zeros."""
    hidden = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [100.0, 100.0]],
        [[50.0, 50.0], [50.0, 50.0], [3.0, 0.0], [0.0, 3.0]],
        [[-4.0, 5.0], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],
        [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]],
    ])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    pooled = weighted_mean_pool(hidden, mask)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, torch.tensor([[7 / 6, 8 / 6], [1.0, 2.0], [-4.0, 5.0], [0.0, 0.0]]))


def test_the_same_tokens_pool_alike_under_left_and_right_padding_and_any_dtype():
    torch.manual_seed(0)
    tokens = torch.randn(5, 8)
    right = torch.cat([tokens, torch.randn(3, 8)])[None]
    left = torch.cat([torch.randn(3, 8), tokens])[None]
    got_right = weighted_mean_pool(right, torch.tensor([[1] * 5 + [0] * 3]))
    got_left = weighted_mean_pool(left, torch.tensor([[0] * 3 + [1] * 5]))
    expected = (torch.arange(1.0, 6.0)[:, None] * tokens).sum(0, keepdim=True) / 15
    torch.testing.assert_close(got_right, expected)
    torch.testing.assert_close(got_left, expected)
    half = weighted_mean_pool(right.bfloat16(), torch.tensor([[1] * 5 + [0] * 3]))
    assert half.dtype == torch.float32 and torch.allclose(half, expected, atol=0.05)


def test_task_scores_are_each_tasks_highest_cosine_by_hand(monkeypatch):
    """Pool [3, 0], [1, 1], [0, -2]; queries [1, 0] and [0, 1] of task 0, [-1, 0] of task 1.
    Cosines: row 0: 1, 0 | -1; row 1: 1/sqrt2, 1/sqrt2 | -1/sqrt2; row 2: 0, -1 | 0. Task maxima:
    [1, -1], [1/sqrt2, -1/sqrt2], [0, 0] (a mean would give row 2 -0.5 for task 0). Blocks of one
    row give the same."""
    pool = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    task = torch.tensor([0, 0, 1])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, -1.0], [r, -r], [0.0, 0.0]])
    torch.testing.assert_close(task_scores(pool, queries, task, 2), expected)
    monkeypatch.setattr(rds, "SIMILARITY_FLOATS", 3)  # 3 // 3 queries: one pool row a block
    torch.testing.assert_close(task_scores(pool, queries, task, 2), expected)


def test_round_robin_over_three_tasks_by_hand():
    """Task orders (descending, ties by row): t0: 0, 1 (0.9 both: row 0 first), 4, 2, 3, 5;
    t1: 2, 1, 3, 4, 0, 5; t2: 3, 4, 0, 1, 2, 5. Round 1: t0 takes 0, t1 2, t2 3. Round 2: t0 takes
    1; t1's next ones, 1 and 3, are taken, so it takes 4; t2's 4, 0, 1, 2, 3 are all taken: 5."""
    scores = torch.tensor([
        [0.9, 0.1, 0.5],
        [0.9, 0.8, 0.2],
        [0.2, 0.95, 0.1],
        [0.1, 0.3, 0.9],
        [0.5, 0.2, 0.85],
        [0.0, 0.0, 0.0],
    ])
    assert round_robin(scores, 2) == [0, 2]
    assert round_robin(scores, 5) == [0, 2, 3, 1, 4]
    assert round_robin(scores, 6) == [0, 2, 3, 1, 4, 5]
    assert round_robin(scores, 10) == [0, 2, 3, 1, 4, 5]  # capped at N
    # Two tasks tied everywhere: the earlier row first, each task in turn.
    assert round_robin(torch.zeros(4, 2), 3) == [0, 1, 2]


def test_round_robin_with_one_task_is_the_top_of_the_scores():
    column = [0.5, 0.9, 0.5, 0.1, 0.7]
    assert round_robin(torch.tensor(column)[:, None], 3) == [1, 4, 0]
    assert sorted(round_robin(torch.tensor(column)[:, None], 3)) == keep_top(column, 3, highest=True)
    assert round_robin(torch.tensor(column)[:, None], 4) == [1, 4, 0, 2]  # the tie: row 0 before row 2


def test_a_target_record_without_the_task_field_is_an_error_naming_it():
    cfg = SelectConfig(model="m", data="d", out="o", selector="rds", less_target_field="task")
    inputs = SelectorInputs(None, target_metadata=[{"task": "a"}, {}])
    with pytest.raises(QTuneError, match="--less-target-field 'task': 1 target records have no metadata"):
        SELECTORS["rds"]().choose(cfg, inputs)


def _direct_pool(model, sample) -> torch.Tensor:
    """One sample alone (no padding): the last hidden states, each position i (1-based) weighted
    i / (n (n + 1) / 2)."""
    ids = torch.tensor(sample["input_ids"])[None]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float()
    n = hidden.shape[0]
    weights = torch.arange(1, n + 1, dtype=torch.float32) / (n * (n + 1) / 2)
    return (weights[:, None] * hidden).sum(0)


def test_the_last_hidden_state_is_what_the_head_reads_and_batches_change_nothing(tiny_run_inputs):
    """The pooled states equal a sample-by-sample computation, whatever the batch size (padding),
    and the hidden states pooled are the LM head's input (after the final norm)."""
    model_dir, data = tiny_run_inputs
    cfg = SelectConfig(model=str(model_dir), data=str(data), out="unused", selector="rds", limit=10)
    _, pad_id, _, samples, model = load_for_scoring(cfg)
    captured = {}
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    ids = torch.tensor(samples[0]["input_ids"])[None]
    with torch.no_grad():
        last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    handle.remove()
    torch.testing.assert_close(last, captured["h"])
    direct = torch.stack([_direct_pool(model, samples[i]) for i in range(len(samples))])
    for batch_size in (1, 4, 10):
        got = pooled_hidden_states(model, samples, pad_token_id=pad_id, batch_size=batch_size, progress=False)
        assert got.shape == (len(samples), model.config.hidden_size) and got.dtype == torch.float32
        torch.testing.assert_close(got, direct, rtol=1e-4, atol=1e-5)


def _direct_choice(cfg, task_of) -> tuple[list[int], list[float]]:
    """(the kept sample ids, each sample's best task score) computed sample by sample: direct pools,
    the full cosine matrix, each task's max, then the round-robin (single task: the top)."""
    tokenizer, _, _, samples, model = load_for_scoring(cfg)
    targets, metadata = load_target(cfg, tokenizer)
    pool = torch.nn.functional.normalize(torch.stack([_direct_pool(model, samples[i]) for i in range(len(samples))]))
    query = torch.nn.functional.normalize(torch.stack([_direct_pool(model, targets[i])
                                                       for i in range(len(targets))]))
    cosine = pool @ query.T
    names = sorted({task_of(m) for m in metadata})
    table = torch.stack([cosine[:, [task_of(m) == name for m in metadata]].max(dim=1).values for name in names], 1)
    order = sorted(range(len(samples)), key=lambda i: samples[i]["sample_id"])
    table = table[order]
    ids = [samples[i]["sample_id"] for i in order]
    count = keep_count(cfg.ratio, len(ids))
    if len(names) == 1:
        positions = sorted(range(len(ids)), key=lambda i: (-float(table[i, 0]), i))[:count]
    else:
        positions = round_robin(table, count)
    return sorted(ids[i] for i in positions), table.max(dim=1).values.tolist()


def test_rds_keeps_the_count_and_the_top_of_a_direct_computation(tiny_run_inputs, tmp_path):
    """Targets: three records of the training set itself (tasks a, a, b). One task: the 12 kept
    (keep_count(0.25, 48)) are the 12 highest direct max-cosines, the targets' twins among them
    (cosine 1); with --less-target-field task, the tasks' round-robin over the direct table."""
    model_dir, data = tiny_run_inputs
    lines = data.read_text().splitlines()
    twins = {3: "a", 17: "a", 30: "b"}
    with open(tmp_path / "target.jsonl", "w") as f:
        for i, name in twins.items():
            record = json.loads(lines[i])
            record["metadata"] = {"task": name}
            f.write(json.dumps(record) + "\n")
    options = dict(model=str(model_dir), data=str(data), selector="rds", ratio=0.25, plot=False, scores=False,
                   batch_size=4, target_data=str(tmp_path / "target.jsonl"))
    with pytest.raises(QTuneError, match="the rds selector needs --target-data"):
        run_select(SelectConfig(out=str(tmp_path / "none"), **{**options, "target_data": None}))

    for field, out in ((None, "one"), ("task", "two")):
        cfg = SelectConfig(out=str(tmp_path / out), less_target_field=field, **options)
        summary = run_select(cfg)
        expected, best = _direct_choice(cfg, (lambda m: m.get(field, "all")) if field else (lambda m: "all"))
        assert summary["n_kept"] == keep_count(0.25, len(lines)) == 12
        assert summary["stats"]["tasks"] == (["a", "b"] if field else ["all"])
        assert summary["stats"]["target_samples"] == 3 and summary["stats"]["hidden_size"] == 32
        table = pq.read_table(tmp_path / out / "scores.parquet").to_pydict()
        kept_ids = sorted(s for s, k in zip(table["sample_id"], table["kept"]) if k)
        assert kept_ids == expected
        torch.testing.assert_close(torch.tensor(table["score"]), torch.tensor(best), rtol=1e-4, atol=1e-5)
        kept = [json.loads(line) for line in (tmp_path / out / "selected.jsonl").read_text().splitlines()]
        assert len(kept) == 12 and all(json.loads(lines[i]) in kept for i in twins)
        assert all(table["score"][i] == pytest.approx(1.0, abs=1e-5) for i in twins)


def test_select_help_lists_rds(capsys):
    from qtune.cli import main

    with pytest.raises(SystemExit) as info:
        main(["select", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0 and "rds (RDS+" in text and "less and rds selectors" in text

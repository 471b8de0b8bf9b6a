"""UDS (`qtune.methods.uds`, `qtune.logit_matrix`): nuclear norms and sketches of the logits matrix
from the hidden states against the materialised logits, the rule's decision and memory buffer on a
hand-made batch, the buffer restored on --resume, and 2 processes deciding as 1."""

import json
import math

import pytest
import torch
from test_distributed import launch
from test_scorer import batch, llama
from test_train import fake_scores, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)

from qtune.config import TrainConfig
from qtune.logit_matrix import LogitSketch, LogitSummaries, gram_factor
from qtune.methods import build_method
from qtune.pruning import keep_count
from qtune.scorer import Scorer
from qtune.scoring import response_positions, score_batch
from qtune.train import read_step_log, run_train


def split_rows(matrix, lengths):
    return list(torch.split(matrix, lengths))


def sample_index(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("vocab,bias", [(20, True), (20, False), (4, False)])
def test_nuclear_norms_from_hidden_states_are_those_of_the_logits(vocab, bias):
    """||H W^T + b||_* through the head's Gram factor equals svdvals of the materialised logits: samples
    shorter and longer than the hidden size, with a bias, and with a singular Gram matrix (V = 4 < d)."""
    torch.manual_seed(0)
    d, lengths = 6, [4, 9, 1]
    weight = torch.randn(vocab, d, dtype=torch.float64) * 2
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    hidden = torch.randn(sum(lengths), d, dtype=torch.float64)
    logits = hidden @ weight.T + (0 if b is None else b)
    expected = torch.stack([torch.linalg.svdvals(m).sum() for m in split_rows(logits, lengths)])
    norms, sketches = LogitSummaries(nuclear_norm=True).of_hidden(hidden, weight, b, sample_index(lengths), 3)
    assert sketches is None
    torch.testing.assert_close(norms.double(), expected, rtol=1e-5, atol=1e-5)
    factor = gram_factor(weight, b)  # M M^T = F^T F, F = [W, b]
    columns = weight if b is None else torch.cat([weight, b[:, None]], dim=1)
    torch.testing.assert_close(factor @ factor.T, columns.T @ columns)
    from_logits, _ = LogitSummaries(nuclear_norm=True).of_logits(logits, sample_index(lengths), 3)
    torch.testing.assert_close(from_logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_sketch_is_the_bilinear_countsketch_and_keeps_norms_on_average():
    """S = A L B with A, B the sketch's sign-hash matrices, from the hidden states and from the logits;
    E ||S||_F^2 = ||L||_F^2 (averaged over 4,000 seeds, within 5%, about 3 standard errors)."""
    torch.manual_seed(1)
    d, vocab, lengths = 5, 30, [7, 3]
    weight, b = torch.randn(vocab, d, dtype=torch.float64), torch.randn(vocab, dtype=torch.float64)
    hidden = torch.randn(sum(lengths), d, dtype=torch.float64)
    logits = hidden @ weight.T + b
    sketch = LogitSketch(rows=3, columns=4, seed=5)
    _, from_hidden = LogitSummaries(sketch=sketch).of_hidden(hidden, weight, b, sample_index(lengths), 2)
    _, from_logits = LogitSummaries(sketch=sketch).of_logits(logits, sample_index(lengths), 2)
    for i, rows in enumerate(split_rows(logits, lengths)):
        left, right = sketch.matrices(len(rows), vocab)
        expected = (left @ rows @ right).flatten().float()
        torch.testing.assert_close(from_hidden[i], expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(from_logits[i], expected, rtol=1e-5, atol=1e-4)
    # The position hash of a block does not depend on how many positions were asked for.
    assert torch.equal(sketch.position_hash(5)[0], sketch.position_hash(2000)[0][:5])
    rows = split_rows(logits, lengths)[0]
    energy = []
    for seed in range(4000):
        left, right = LogitSketch(rows=3, columns=4, seed=seed).matrices(len(rows), vocab)
        energy.append(float((left @ rows @ right).square().sum()))
    assert sum(energy) / len(energy) == pytest.approx(float(rows.square().sum()), rel=0.05)


def test_score_batch_summarises_the_logits_on_each_head_path():
    """The scoring pass's nuclear norms are svdvals of the model's own logits at the response-predicting
    positions, on the chunked and on the logits path; the sketches agree between the paths."""
    model, b = llama(2), batch([12, 9, 7])
    response = response_positions(b["labels"])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    rows, cols = response.nonzero(as_tuple=True)
    matrices = split_rows(logits[rows, cols - 1], response.sum(1).tolist())
    expected = torch.stack([torch.linalg.svdvals(m).sum() for m in matrices])
    got = {}
    for impl in ("chunked", "logits"):
        summaries = LogitSummaries(nuclear_norm=True, sketch=LogitSketch(rows=2, columns=8))
        got[impl] = score_batch(model, b["input_ids"], b["attention_mask"], b["labels"], head_impl=impl,
                                summaries=summaries)
        torch.testing.assert_close(got[impl].nuclear_norm.double(), expected, rtol=1e-4, atol=1e-4)
        assert got[impl].logit_sketch.shape == (3, 16)
    torch.testing.assert_close(got["chunked"].logit_sketch, got["logits"].logit_sketch, rtol=1e-4, atol=1e-4)
    plain = score_batch(model, b["input_ids"], b["attention_mask"], b["labels"])
    assert plain.nuclear_norm is None and plain.logit_sketch is None


def test_reused_scores_keep_the_whole_sketch():
    """Score reuse (`rescore_drift`) caches per-sample vectors whole, not cut to the row's length."""
    model, b = llama(2), batch([12, 9, 7], ids=[1, 2, 3])
    scorer = Scorer(rescore_drift=1.0, nuclear_norm=True, logit_sketch=LogitSketch(rows=4, columns=8))
    first = scorer(model, [b])[0]
    scorer.moved(0.1, 10.0)
    again = scorer(model, [b])[0]
    assert scorer.reused == 3 and again.logit_sketch.shape == (3, 32)
    torch.testing.assert_close(again.logit_sketch, first.logit_sketch)
    torch.testing.assert_close(again.nuclear_norm, first.nuclear_norm)


def uds(**options):
    values = dict(r_sample=0.5, uds_alpha=1.0, uds_buffer=3)
    values.update(options)
    return build_method("uds+all", TrainConfig(model="m", data="d", out="o", **values))


def hand_scores(b, norms, sketches):
    scores = fake_scores(b, [1.0] * len(norms), [1.0] * len(norms))
    scores.nuclear_norm = torch.tensor(norms)
    scores.logit_sketch = torch.tensor(sketches)
    return scores


def test_uds_decides_by_utility_plus_distance_to_its_buffer():
    """Step 0: empty buffer, the highest nuclear norms win. Step 1: norm + alpha x mean distance to the
    buffered sketches, computed by hand; the buffer keeps the last 3 kept sketches, oldest first."""
    method = uds()
    first = batch([8, 8, 8, 8], ids=[10, 11, 12, 13])
    scores = hand_scores(first, [5.0, 9.0, 1.0, 7.0], [[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 2.0]])
    decision = method.select([first], [scores], 0)
    assert decision.selections[0].rows.tolist() == [1, 3]
    assert decision.stats["uds_buffer"] == 2 and decision.stats["uds_diversity"] == 0.0
    assert method.rule_state.sketches.tolist() == [[3.0, 4.0], [0.0, 2.0]]

    second = batch([8, 8, 8, 8], ids=[20, 21, 22, 23], seed=1)
    sketches = [[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, -3.0]]
    buffer = [[3.0, 4.0], [0.0, 2.0]]
    distance = [sum(math.dist(s, m) for m in buffer) / 2 for s in sketches]
    assert distance == pytest.approx([3.5, math.sqrt(13) / 2, (5 + math.sqrt(72)) / 2, (math.sqrt(58) + 5) / 2])
    norms = [6.0, 8.5, 2.0, 3.0]
    total = [n + d for n, d in zip(norms, distance)]  # 9.50, 10.30, 8.74, 9.31: rows 1 and 0
    decision = method.select([second], [hand_scores(second, norms, sketches)], 1)
    assert decision.selections[0].rows.tolist() == sorted(sorted(range(4), key=lambda i: -total[i])[:2]) == [0, 1]
    assert decision.stats["uds_diversity"] == pytest.approx((distance[0] + distance[1]) / 2)
    assert method.rule_state.sketches.tolist() == [[0.0, 2.0], [0.0, 0.0], [3.0, 4.0]]  # [3, 4] of step 0 left

    # The state survives JSON; with alpha 2 and that buffer, row 2 (far from it) overtakes row 0.
    heavy = uds(uds_alpha=2.0)
    heavy.load_state_dict(json.loads(json.dumps(method.state_dict())))
    torch.testing.assert_close(heavy.rule_state.sketches, method.rule_state.sketches)
    again = heavy.select([second], [hand_scores(second, norms, sketches)], 2)
    buffer = [[0.0, 2.0], [0.0, 0.0], [3.0, 4.0]]
    distance = [sum(math.dist(s, m) for m in buffer) / 3 for s in sketches]
    total = [n + 2 * d for n, d in zip(norms, distance)]
    assert again.selections[0].rows.tolist() == sorted(sorted(range(4), key=lambda i: -total[i])[:2]) == [1, 2]


def test_uds_keeps_the_share_and_ties_go_to_the_earlier_sample():
    method = uds(r_sample=0.25)
    b = batch([6] * 8)
    decision = method.select([b], [hand_scores(b, [2.0] * 8, [[1.0]] * 8)], 0)
    assert decision.selections[0].rows.tolist() == list(range(keep_count(0.25, 8)))


def uds_run(inputs, out, **overrides):
    # A constant learning rate: a run of 2 steps then resumed updates as one of 3.
    values = dict(method="uds+all", r_sample=0.5, uds_buffer=6, batch_size=4, grad_accum=2, save_steps=1,
                  max_steps=3, lr_scheduler="constant")
    values.update(overrides)
    return train_config(inputs, out, **values)


def method_state(checkpoint):
    return json.loads((checkpoint / "qtune-method-state.json").read_text())["states"]


def test_uds_buffer_is_restored_on_resume(tiny_run_inputs, tmp_path):
    """A run stopped after 2 steps and resumed decides step 3 as the uninterrupted run, and ends with
    the same buffer (a fresh buffer would hold step 3's kept sketches only)."""
    run_train(uds_run(tiny_run_inputs, tmp_path / "straight"))
    run_train(uds_run(tiny_run_inputs, tmp_path / "stopped", max_steps=2))
    state = method_state(tmp_path / "stopped" / "checkpoint-2")[0]["sample_rule"]
    assert state["shape"] == [6, 8 * 128]  # 2 steps x 4 kept of 8 samples, the last 6
    run_train(uds_run(tiny_run_inputs, tmp_path / "stopped", resume=True, allow_config_change="max_steps"))
    straight, resumed = (read_step_log(tmp_path / r / "steps.jsonl") for r in ("straight", "stopped"))
    assert [r["kept_ids"] for r in resumed] == [r["kept_ids"] for r in straight]
    assert resumed[2]["uds_diversity"] == pytest.approx(straight[2]["uds_diversity"], rel=1e-5)
    final = [method_state(tmp_path / r / "checkpoint-3")[0]["sample_rule"] for r in ("straight", "stopped")]
    assert final[0]["shape"] == final[1]["shape"] == [6, 1024]


def test_two_processes_decide_as_one(tiny_run_inputs, tmp_path):
    """2 processes x 1 micro-batch of 4 against 1 process x 2 (the same global batches): the same kept
    samples at every step, and the same buffer on both processes as in the single process."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch(tmp_path, uds_run(tiny_run_inputs, one), 1)
    launch(tmp_path, uds_run(tiny_run_inputs, two, grad_accum=1), 2)
    rows = [read_step_log(out / "steps.jsonl") for out in (one, two)]
    assert [r["sample_ids"] for r in rows[0]] == [r["sample_ids"] for r in rows[1]]
    assert [r["kept_ids"] for r in rows[0]] == [r["kept_ids"] for r in rows[1]]
    (single,), (rank0, rank1) = method_state(one / "checkpoint-3"), method_state(two / "checkpoint-3")
    assert rank0 == rank1 and rank0["sample_rule"]["shape"] == single["sample_rule"]["shape"] == [6, 1024]
    buffers = []
    for state in (single, rank0):  # equal up to float rounding: the rows were padded to other widths
        method = uds(uds_buffer=6)
        method.load_state_dict(state)
        buffers.append(method.rule_state.sketches)
    torch.testing.assert_close(buffers[1], buffers[0], rtol=1e-4, atol=1e-5)


def test_head_factors_are_recomputed_only_when_the_head_changes():
    """The Gram factor is kept while the head's weight is unchanged and recomputed after an update,
    even one that leaves its version counter alone (as fused optimizers do): the norms follow it."""
    torch.manual_seed(2)
    weight, hidden = torch.randn(12, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    rows = sample_index([5])
    summaries = LogitSummaries(nuclear_norm=True)
    first, _ = summaries.of_hidden(hidden, weight, None, rows, 1)
    kept = summaries._head
    summaries.of_hidden(hidden, weight, None, rows, 1)
    assert summaries._head is kept
    weight.data.mul_(3)  # through .data: the version counter does not move (as with a fused optimizer)
    again, _ = summaries.of_hidden(hidden, weight, None, rows, 1)
    assert summaries._head is not kept
    torch.testing.assert_close(again, 3 * first)

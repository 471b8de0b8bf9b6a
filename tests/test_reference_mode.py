"""`qtuning --reference`: the authors' code's behaviour, each difference on a hand-made batch
(docs/pruning.md, issue 12): per-micro-batch triage, the pooled budget counted over attended
positions, no Stage 2 at r_token = 1, no bridging across turns, the per-micro-batch loss
normaliser. (Linear quantiles: tests/test_pruning.py, against numpy.)"""

import torch
from test_methods import config

from qtune.methods import build_method
from qtune.pruning import prune_tokens, triage
from qtune.scoring import BatchScores


def micro_batch(ppl, ent, prompt: int, response: int, padding=()):
    """Rows of `prompt` prompt positions then `response` response positions (the first label of a
    row never counts), minus `padding[i]` padded positions at the end of row i; token NLLs rising
    along each row (0.1, 0.2, ...)."""
    n, width = len(ppl), prompt + response
    attention = torch.ones(n, width, dtype=torch.long)
    for row, pad in enumerate(padding):
        attention[row, width - pad:] = 0
    response_mask = torch.zeros(n, width, dtype=torch.bool)
    response_mask[:, prompt:] = True
    response_mask &= attention.bool()
    nll = torch.where(response_mask, torch.arange(width, dtype=torch.float32) / 10, 0.0)
    scores = BatchScores(nll=nll, entropy=torch.zeros(n, width), response_mask=response_mask,
                         ppl=torch.tensor(ppl), ent=torch.tensor(ent), n_response=response_mask.sum(1))
    labels = torch.where(response_mask, 5, -100)
    batch = {"input_ids": torch.full((n, width), 5), "attention_mask": attention, "labels": labels,
             "sample_id": torch.arange(n)}
    return batch, scores


def reference(**options):
    return build_method("qtuning", config(reference=True, lam=0.0, **options))


def test_each_micro_batch_is_triaged_on_its_own():
    """Micro-batch A holds the step's two clear Q2 samples (high PPL, low entropy) and its two
    clear Q4 ones, B four samples in the middle of both axes. Triaged together (default), the
    step keeps A's four and none of B; per micro-batch (reference), each keeps two of its own."""
    a = micro_batch([9.0, 8.0, 1.5, 1.2], [1.0, 1.5, 8.0, 9.0], prompt=2, response=4)
    b = micro_batch([4.0, 3.0, 5.0, 5.5], [4.0, 4.2, 4.5, 5.0], prompt=2, response=4)
    batches, scores = [a[0], b[0]], [a[1], b[1]]
    decision = reference(r_sample=0.5, r_token=1.0).select(batches, scores, 0)
    for selection, s in zip(decision.selections, scores):
        assert selection.rows.tolist() == triage(s.ppl, s.ent, 0.5, reference=True).keep.tolist()
        assert len(selection.rows) == 2
    together = build_method("qtuning", config(r_sample=0.5, r_token=1.0)).select(batches, scores, 0)
    assert [s.rows.tolist() for s in together.selections] == [[0, 1, 2, 3], []]


def test_pooled_budget_counts_attended_positions_and_r_token_one_skips_stage_two():
    """4 rows of 3 prompt + 5 response positions (row 3 has 2 padded), 30 attended positions.
    r_sample 0.5, r_token 0.6: round(30 x 0.3) = 9 positions survive, of which the kept rows' 6
    prompt positions: 3 response tokens survive over the kept rows."""
    batch, scores = micro_batch([9.0, 1.0, 8.0, 2.0], [1.0, 1.5, 6.0, 7.0], prompt=3, response=5, padding=(0, 0, 0, 2))
    assert int(batch["attention_mask"].sum()) == 30
    method = reference(r_sample=0.5, r_token=0.6)
    decision = method.select([batch], [scores], 0)
    selection = decision.selections[0]
    kept_rows = triage(scores.ppl, scores.ent, 0.5, reference=True)
    assert selection.rows.tolist() == kept_rows.keep.tolist() == [0, 3]  # Q2 row 0, Q4 row 3
    mask = selection.label_mask
    # Row 3 (Q4, 3 response positions) keeps all; row 0 (Q2) keeps 3 - 3 = 0: its 5 are pooled out.
    assert int(mask[3].sum()) == 3 and int(mask[0].sum()) == 0
    every = reference(r_sample=0.5, r_token=1.0).select([batch], [scores], 0).selections[0].label_mask
    assert int(every[0].sum()) == 5  # r_token = 1: no Stage 2 at all


def test_no_bridging_across_turns():
    """Response positions 0, 1 and 4, 5 (a prompt between), token perplexities 1 9 . . 9 1,
    lam 0.5, neighbours summed, a missing one 0. Bridged: scores 5 9.5 9.5 5, the two 5s stay.
    Not bridged (reference): 5 5 5 5, ties by position: positions 0 and 1 stay."""
    tokppl = torch.tensor([[1.0, 9, 3, 3, 9, 1]])
    response = torch.tensor([[True, True, False, False, True, True]])
    bridged = prune_tokens(tokppl, response, 0.5)
    alone = prune_tokens(tokppl, response, 0.5, bridge=False)
    assert bridged.nonzero()[:, 1].tolist() == [0, 5]
    assert alone.nonzero()[:, 1].tolist() == [0, 1]


def test_loss_is_normalised_per_micro_batch_by_the_kept_rows_attended_positions():
    """Two micro-batches, r_token 1: the kept rows keep every response token. Weights K / (A_m x M)
    make sum(w x CE) / K the mean over micro-batches of sum(CE) / A_m."""
    a = micro_batch([9.0, 1.0, 8.0, 2.0], [1.0, 1.5, 6.0, 7.0], prompt=3, response=5)
    b = micro_batch([9.0, 1.0, 8.0, 2.0], [1.0, 1.5, 6.0, 7.0], prompt=1, response=3)
    decision = reference(r_sample=0.5, r_token=1.0).select([a[0], b[0]], [a[1], b[1]], 0)
    kept = sum(int(s.label_mask[s.rows].sum()) for s in decision.selections)
    assert kept == 2 * 5 + 2 * 3
    for selection, attended in zip(decision.selections, (2 * 8, 2 * 4)):
        weights = selection.weights[selection.label_mask]
        torch.testing.assert_close(weights, torch.full_like(weights, kept / (attended * 2)))
        assert not selection.weights[~selection.label_mask].any()
    # With CE = 1 on every kept token: (sum of weights) / K = mean over m of (kept tokens_m / A_m).
    total = sum(float(s.weights.sum()) for s in decision.selections) / kept
    assert abs(total - (10 / 16 + 6 / 8) / 2) < 1e-6

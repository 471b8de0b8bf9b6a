"""Q-Tuning's ablations (`QTuningAblationConfig`) on hand-computed examples: keep Q1, reversed
token order, one stage only, token-pruning Q4."""

import torch
from test_methods import config

from qtune.methods import build_method
from qtune.pruning import prune_tokens, triage
from qtune.scoring import BatchScores

# Eight samples on the EU plane: 0 and 4 are Q1 (high PPL, high entropy), 1 and 5 Q2, 2 and 6 Q3,
# 3 and 7 Q4.
PPL = torch.tensor([10.0, 9, 1, 2, 8, 7, 3, 4])
ENT = torch.tensor([10.0, 1, 1, 9, 8, 2, 3, 7])


def test_triage_keeping_q1():
    """Sorted PPL 1 2 3 4 7 8 9 10, entropy 1 1 2 3 7 8 9 10; 4 of 8 to keep. Without Q1, Q2 + Q4
    reach 4 members only once the thresholds are PPL >= 7 / <= 4 and entropy >= 7 / <= 3: samples
    1, 3, 5, 7. With Q1, at the level of the 2nd-smallest and 6th-smallest values (PPL <= 2 or
    >= 8, entropy <= 1 or >= 8) Q1 = {0, 4}, Q2 = {1}, Q4 = {3} already make 4; Q1's tokens are
    pruned as Q2's."""
    plain = triage(PPL, ENT, 0.5)
    assert plain.keep.tolist() == [1, 3, 5, 7]
    assert plain.prune_tokens.nonzero().flatten().tolist() == [1, 5]
    with_q1 = triage(PPL, ENT, 0.5, keep_q1=True)
    assert with_q1.keep.tolist() == [0, 1, 3, 4]
    assert with_q1.quadrant[with_q1.keep].tolist() == [1, 2, 4, 1]
    assert with_q1.prune_tokens.nonzero().flatten().tolist() == [0, 1, 4]
    assert (with_q1.thresholds["ppl_lo"], with_q1.thresholds["ppl_hi"]) == (2.0, 8.0)


def test_reversed_token_order_keeps_the_highest_scores():
    """lam = 0: the score is the token perplexity. Half of 4 tokens: the lowest two (1, 2) by
    default, the highest two (8, 5) reversed; a tie keeps the earlier position in both orders."""
    tokppl = torch.tensor([[1.0, 5, 2, 8, 9], [3.0, 3, 3, 3, 1]])
    response = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    plain = prune_tokens(tokppl, response, 0.5, lam=0.0)
    reverse = prune_tokens(tokppl, response, 0.5, lam=0.0, reverse=True)
    assert plain.tolist() == [[True, False, True, False, False], [True, False, False, False, True]]
    assert reverse.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    # The pooled budget (authors' code): 5 of the 9 tokens stay; the 4 removed are the highest
    # (default) or the lowest (reversed) of the pool.
    pooled = prune_tokens(tokppl, response, 0.5, lam=0.0, budget="batch", batch_keep=5, reverse=True)
    assert pooled.sum() == 5 and not pooled[0, 0] and not pooled[1, 4] and pooled[0, 3]


def scores_and_batch():
    """The eight samples above, 4 response tokens each (positions 1-4 of 6) with NLLs 0.1 0.4
    0.2 0.3: the lowest-score half is positions 1 and 3 at lam = 0."""
    n, width = 8, 6
    response = torch.zeros(n, width, dtype=torch.bool)
    response[:, 1:5] = True
    nll = torch.zeros(n, width)
    nll[:, 1:5] = torch.tensor([0.1, 0.4, 0.2, 0.3])
    scores = BatchScores(nll=nll, entropy=torch.zeros(n, width), response_mask=response, ppl=PPL, ent=ENT,
                         n_response=response.sum(1))
    labels = torch.where(response, 7, -100)
    labels[:, 0] = 7  # the first label has no prediction: not a response position
    batch = {"input_ids": torch.full((n, width), 7), "attention_mask": torch.ones(n, width, dtype=torch.long),
             "labels": labels, "sample_id": torch.arange(n)}
    return [scores], [batch]


def decide(**options):
    scores, batches = scores_and_batch()
    method = build_method("qtuning", config(r_sample=0.5, r_token=0.5, lam=0.0, **options))
    selection = method.select(batches, scores, 0).selections[0]
    return method, selection.rows.tolist(), selection.label_mask


def test_stages_and_token_pruning_of_q4():
    half = [False, True, False, True, False, False]  # positions 1 and 3 keep their loss
    whole = [False, True, True, True, True, False]
    method, rows, mask = decide()
    assert rows == [1, 3, 5, 7] and method.nominal_budget == 0.25
    assert [mask[r].tolist() for r in rows] == [half, whole, half, whole]  # Q2 pruned, Q4 whole

    method, rows, mask = decide(stages="sample")
    assert rows == [1, 3, 5, 7] and method.nominal_budget == 0.5
    assert all(mask[r].tolist() == whole for r in rows)

    method, rows, mask = decide(stages="token")
    assert rows == list(range(8)) and method.nominal_budget == 0.5
    assert all(mask[r].tolist() == half for r in rows)

    _, rows, mask = decide(prune_q4=True)
    assert rows == [1, 3, 5, 7] and all(mask[r].tolist() == half for r in rows)

    _, rows, mask = decide(keep_q1=True)
    assert rows == [0, 1, 3, 4]
    assert [mask[r].tolist() for r in rows] == [half, half, whole, half]

    _, rows, mask = decide(reversed_tokens=True)
    assert mask[1].tolist() == [False, False, True, False, True, False]  # NLL 0.4 and 0.3 kept

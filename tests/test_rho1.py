"""The `rho1` token rule (excess loss over a reference model) and the reference scores behind it."""

import pytest
import torch
from test_baselines import kept_positions, method, scores_for
from test_scorer import batch as scorer_batch
from test_scorer import llama
from test_train import make_batch, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)

from qtune.errors import QTuneError
from qtune.scorer import Scorer
from qtune.scoring import score_batch
from qtune.train import read_step_log, run_train


def test_rho1_keeps_the_tokens_of_highest_excess_loss():
    """Response NLLs 1.0 2.0 3.0 0.5 0.7, reference 0.2 1.9 1.0 0.4 0.6: excess 0.8 0.1 2.0 0.1 0.1.
    Keep 3 of 5 (r_token 0.6): positions of 2.0 and 0.8, then the first of the three 0.1s."""
    batch = make_batch([8])  # response positions 3..7
    scores = scores_for(batch, [[1.0, 2.0, 3.0, 0.5, 0.7]])
    scores.reference_nll = scores_for(batch, [[0.2, 1.9, 1.0, 0.4, 0.6]]).nll
    decision = method("longest+rho1", r_sample=1.0, r_token=0.6).select([batch], [scores], 0)
    assert kept_positions(decision) == [3, 4, 5]
    assert method("longest+rho1").needs == {"nll", "reference_nll"}


def test_the_scorer_adds_the_reference_models_token_nll():
    trained, reference = llama(2), llama(1, seed=4)
    b = scorer_batch([10, 7])
    scores = Scorer(reference=reference)(trained, [b])[0]
    torch.testing.assert_close(scores.reference_nll, score_batch(reference, b["input_ids"], b["attention_mask"],
                                                                 b["labels"]).nll)
    torch.testing.assert_close(scores.nll, score_batch(trained, b["input_ids"], b["attention_mask"], b["labels"]).nll)
    assert Scorer()(trained, [b])[0].reference_nll is None


def test_rho1_trains_with_a_reference_model_and_asks_for_one(tiny_run_inputs, tmp_path):
    model_dir, _ = tiny_run_inputs
    with pytest.raises(QTuneError, match="needs a reference model's token losses: give --reference-model"):
        run_train(train_config(tiny_run_inputs, tmp_path / "none", method="random+rho1"))
    run_train(train_config(tiny_run_inputs, tmp_path / "run", method="random+rho1", r_token=0.5,
                           reference_model=str(model_dir)))
    rows = read_step_log(tmp_path / "run" / "steps.jsonl")
    assert rows and all(0 < r["kept_tokens"] < r["response_tokens"] for r in rows)

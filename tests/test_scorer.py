"""Where a step's scores come from (`qtune.scorer`): early exit, reuse across visits, a reference
model's losses."""

import pytest
import torch
from test_train import make_batch, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from qtune.errors import QTuneError
from qtune.scorer import DriftMeter, Scorer, build_scorer, first_layers
from qtune.scoring import IGNORE_INDEX, score_batch
from qtune.train import read_step_log, run_train

VOCAB = 64


def llama(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batch(lengths, seed=0, ids=None):
    """test_train's right-padded batch (3 prompt tokens a row) in this file's vocabulary; `ids`:
    its sample ids."""
    b = make_batch(lengths, vocab=VOCAB, seed=seed)
    if ids is not None:
        b["sample_id"] = torch.tensor(ids)
    return b


def scores_of(model, b):
    return score_batch(model, b["input_ids"], b["attention_mask"], b["labels"])


def assert_same(a, b):
    for key in ("nll", "entropy", "response_mask", "ppl", "ent", "n_response"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), msg=key)


def test_first_layers_scores_as_a_shallower_model_with_the_same_weights():
    deep, shallow = llama(3), llama(1, seed=1)
    state = {k: v for k, v in deep.state_dict().items() if ".layers.1." not in k and ".layers.2." not in k}
    shallow.load_state_dict(state)
    b = batch([12, 9, 7])
    whole = scores_of(deep, b)
    with first_layers(deep, 1):
        assert_same(scores_of(deep, b), scores_of(shallow, b))
        assert len(deep.model.layers) == 1
    assert len(deep.model.layers) == 3
    assert_same(scores_of(deep, b), whole)  # the model is whole again, with the same scores
    assert_same(Scorer(layers=1)(deep, [b])[0], scores_of(shallow, b))


def test_first_layers_refuses_what_it_cannot_cut():
    with pytest.raises(QTuneError, match="score_layers=2 but the model has 2 decoder layers"):
        with first_layers(llama(2), 2):
            pass
    with pytest.raises(QTuneError, match="needs a decoder whose blocks are a `layers` list"):
        with first_layers(torch.nn.Linear(2, 2), 1):
            pass
    with first_layers(torch.nn.Linear(2, 2), 0) as same:  # 0: nothing to cut, any model
        assert isinstance(same, torch.nn.Linear)


def test_reuse_follows_the_drift_of_the_weights():
    model = llama(2)
    scorer = Scorer(rescore_drift=0.1)
    first = batch([12, 9, 7], ids=[10, 11, 12])
    scorer(model, [first])
    assert (scorer.scored, scorer.reused) == (3, 0)
    scorer(model, [first])  # no step measured yet: nothing counts as fresh
    assert (scorer.scored, scorer.reused) == (6, 0)

    scorer.moved(0.5, 10.0)  # path 0.5 < 0.1 x 10: reused
    with torch.no_grad():  # even though the weights changed: the scores are the visit's
        model.lm_head.weight.mul_(2)
    # The same samples in another micro-batch, with a new one and another padded width.
    second = batch([7, 14, 12], ids=[12, 13, 10], seed=5)
    for row, source in ((0, 2), (2, 0)):
        second["input_ids"][row] = 0
        n = int(first["attention_mask"][source].sum())
        for key in ("input_ids", "attention_mask", "labels"):
            second[key][row, :n] = first[key][source, :n]
            second[key][row, n:] = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}[key]
    got = scorer(model, [second])[0]
    assert (scorer.scored, scorer.reused) == (7, 2)
    expected_old = scores_of(llama(2), first)
    expected_new = scores_of(model, second)
    for key in ("ppl", "ent", "n_response"):
        torch.testing.assert_close(getattr(got, key)[[0, 2]], getattr(expected_old, key)[[2, 0]])
        torch.testing.assert_close(getattr(got, key)[1], getattr(expected_new, key)[1])
    for key in ("nll", "entropy", "response_mask"):
        assert getattr(got, key).shape == second["input_ids"].shape
        torch.testing.assert_close(getattr(got, key)[0, :7], getattr(expected_old, key)[2, :7])
        assert not getattr(got, key)[0, 7:].any()
        torch.testing.assert_close(getattr(got, key)[1], getattr(expected_new, key)[1])

    scorer.moved(0.6, 10.0)  # samples 10 and 12: path since their visit 1.1 >= 1.0, scored afresh;
    again = scorer(model, [second])[0]  # sample 13: 0.6 < 1.0, reused (scored with these weights)
    assert (scorer.scored, scorer.reused) == (9, 3)
    assert_same(again, scores_of(model, second))


def test_drift_meter_measures_one_step():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    model.register_parameter("frozen", frozen)
    meter = DriftMeter()
    meter.before(model)
    with torch.no_grad():
        model.weight.add_(torch.tensor([[3.0, 0, 0], [0, 0, 0]]))
        model.bias.add_(torch.tensor([0.0, 4.0]))
        frozen.add_(100)  # not trainable: not counted
    step, norm = meter.after(model)
    assert step == pytest.approx(5.0)
    assert norm == pytest.approx(float(torch.cat([model.weight.flatten(), model.bias]).detach().norm()))
    with pytest.raises(RuntimeError):
        meter.after(model)


def test_training_with_each_source(tiny_run_inputs, tmp_path):
    """The Trainer takes scores from the early exit or the cache: the run completes and the step
    log counts reused scores (every sample comes back in the second epoch)."""
    run_train(train_config(tiny_run_inputs, tmp_path / "layers", method="qtuning", score_layers=1))
    run_train(train_config(tiny_run_inputs, tmp_path / "reuse", method="qtuning", max_steps=-1, epochs=2,
                           rescore_drift=1e6))
    rows = read_step_log(tmp_path / "reuse" / "steps.jsonl")
    assert len(rows) == 12
    assert sum(r["reused_scores"] for r in rows[:6]) == 0 and sum(r["reused_scores"] for r in rows[6:]) == 48
    assert "reused_scores" not in read_step_log(tmp_path / "layers" / "steps.jsonl")[0]


def test_reference_model_must_fit_the_tokenizer(tiny_run_inputs, tmp_path, tiny_tokenizer):
    small = tmp_path / "small"
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(small)
    needs = frozenset({"nll", "reference_nll"})
    cfg = train_config(tiny_run_inputs, tmp_path / "run", method="random+rho1", reference_model=str(small))
    with pytest.raises(QTuneError, match="embedding only 8 rows"):
        build_scorer(cfg, tiny_tokenizer, "cpu", needs=needs)
    ok = train_config(tiny_run_inputs, tmp_path / "ok", method="random+rho1", reference_model=str(tiny_run_inputs[0]))
    reference = build_scorer(ok, tiny_tokenizer, "cpu", needs=needs).reference
    assert isinstance(reference, type(AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0])))
    assert not any(p.requires_grad for p in reference.parameters())
    assert build_scorer(ok, tiny_tokenizer, "cpu").reference is None  # not needed, not loaded

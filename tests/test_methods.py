"""The selector contract (`qtune.methods`) and the framework-free step (`qtune.step`): options,
needed scores, budgets, loss weights, state across --resume, static selection, empty shares."""

import dataclasses
import json

import pytest
import torch
from test_train import make_batch, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)
from transformers import AutoModelForCausalLM

from qtune.config import METHOD_NAMES, FullConfig, TrainConfig
from qtune.errors import QTuneError
from qtune.methods import METHODS, Decision, Method, Selection, build_method, register, response_mask_of
from qtune.pruning import keep_count, prune_tokens, token_perplexity, triage
from qtune.scoring import IGNORE_INDEX, DatasetScores
from qtune.step import micro_batch_loss, placeholder_row, plan_step, train_step
from qtune.train import read_step_log, run_train


def config(**values) -> TrainConfig:
    return TrainConfig(model="m", data="d", out="o", **values)


@pytest.fixture
def toy_method():
    """Register methods for one test only (the registry is global: bench grids list it)."""
    added = []

    def add(name, cls):
        register(name)(cls)
        added.append(name)
        return cls

    yield add
    for name in added:
        METHODS.pop(name)
        METHOD_NAMES.discard(name)


# --- the contract --------------------------------------------------------------------------------


def test_each_method_reads_only_its_own_options_which_reach_the_cli():
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.config_class):
            assert f.name in train_fields and train_fields[f.name].default == f.default, (name, f.name)
    method = build_method("qtuning", config(r_sample=0.5, lam=0.2, lr=0.5))
    assert type(method.config).__name__ == "QTuningConfig" and not hasattr(method.config, "lr")
    assert (method.config.r_sample, method.config.lam) == (0.5, 0.2)
    assert not hasattr(build_method("random", config()).config, "lam")


def test_needed_scores_entropy_positions_and_nominal_budget():
    assert build_method("full", config()).needs == frozenset()
    assert build_method("random", config()).needs == frozenset()
    assert build_method("qtuning", config()).needs == {"nll", "entropy"}
    assert build_method("qtuning", config()).entropy_over == "response"
    assert build_method("qtuning", config(reference=True)).entropy_over == "attended"
    assert build_method("full", config(r_sample=0.5)).nominal_budget == 1.0
    assert build_method("random", config(r_sample=0.5, r_token=0.5)).nominal_budget == 0.25
    assert build_method("qtuning", config(r_sample=0.5, r_token=0.6)).nominal_budget == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown scores"):
        register("needs-gradients")(type("Gradients", (Method,), {"needs": frozenset({"gradients"})}))
    assert "needs-gradients" not in METHODS


def test_decision_measures_the_budget_it_kept():
    batches = [make_batch([12] * 8, seed=0), make_batch([10] * 8, seed=1)]
    decision = build_method("random", config(r_sample=0.25, r_token=0.5)).select(batches, None, 0)
    response = sum(int(response_mask_of(b).sum()) for b in batches)
    kept = sum(int(s.label_mask[s.rows].sum()) for s in decision.selections)
    assert (decision.kept_tokens, decision.response_tokens) == (kept, response)
    assert decision.measured_budget == pytest.approx(kept / response)
    assert decision.nominal_budget == 0.125


# --- loss weights and empty shares in the step ---------------------------------------------------


class Weighted(Method):
    """Keeps every row; row 0 weighs 2, row 1 weighs 0, row 2 has per-token weights."""

    config_class = FullConfig

    def select(self, batches, scores, step):
        selections = []
        for b in batches:
            weights = torch.ones(b["labels"].shape)
            weights[0] = 2.0
            weights[1] = 0.0
            weights[2] = torch.linspace(0, 1, b["labels"].shape[1])
            selections.append(Selection(torch.arange(b["labels"].shape[0]), response_mask_of(b), weights))
        return Decision.over(batches, selections, 1.0, {})


def test_loss_weights_are_honoured(tiny_run_inputs, toy_method):
    toy_method("weighted", Weighted)
    model = AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0])
    batch = make_batch([9, 12, 7, 11], vocab=model.config.vocab_size)
    plan = plan_step([batch], None, build_method("weighted", config()), 0, pad_token_id=0)
    loss = micro_batch_loss(model, plan.micro_batches[0], plan.loss_tokens)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   ignore_index=IGNORE_INDEX, reduction="none")
    weights = torch.ones(batch["labels"].shape)
    weights[0], weights[1], weights[2] = 2.0, 0.0, torch.linspace(0, 1, batch["labels"].shape[1])
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    expected = (token_loss * weights[:, 1:]).sum() / n_tokens
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert plan.loss_tokens == n_tokens  # weights change the loss, not the normaliser


def test_kept_rows_take_as_few_micro_batches_as_hold_them(tiny_run_inputs):
    model = AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0])
    batches = [make_batch([8, 6, 7, 9], vocab=model.config.vocab_size, seed=s) for s in (0, 1, 2)]
    for r_sample, rows in ((1 / 12, [1]), (0.25, [3]), (0.5, [3, 3]), (1.0, [4, 4, 4])):
        plan = plan_step(batches, None, build_method("random", config(r_sample=r_sample, r_token=1.0)), 0,
                         pad_token_id=0)
        assert [m["input_ids"].shape[0] for m in plan.micro_batches] == rows
        assert plan.record["trained_positions"] <= sum(b["input_ids"].numel() for b in batches)


def test_a_placeholder_row_runs_a_zero_backward(tiny_run_inputs):
    """A process that keeps no row trains a placeholder row of weight 0, whose backward reaches
    the parameters (DDP needs every process to join) and adds exactly zero."""
    model = AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0])
    placeholder = placeholder_row(make_batch([8, 6], vocab=model.config.vocab_size))
    loss = micro_batch_loss(model, placeholder, 7)
    loss.backward()
    assert float(loss.detach()) == 0.0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)


def test_train_step_runs_the_whole_step_in_a_plain_loop(tiny_run_inputs):
    model = AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0])
    model.train()  # the scoring pass switches to eval mode and back
    batches = [make_batch([12, 9, 11, 10], vocab=model.config.vocab_size, seed=s) for s in (0, 1)]
    plan, loss = train_step(model, batches, build_method("qtuning", config(r_sample=0.25)), 0, 10, pad_token_id=0)
    assert plan.record["kept"] == 2 and plan.record["samples"] == 8 and model.training
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())
    with torch.no_grad():
        again = sum(micro_batch_loss(model, mb, plan.loss_tokens) for mb in plan.micro_batches)
    assert loss == pytest.approx(float(again), rel=1e-5)


# --- state across --resume -----------------------------------------------------------------------


class Counter(Method):
    """Counts the steps it has decided; the count is its state and goes to the step log."""

    config_class = FullConfig

    def __init__(self, config):
        super().__init__(config)
        self.seen = 0

    def select(self, batches, scores, step):
        self.seen += 1
        n = sum(b["labels"].shape[0] for b in batches)
        selections = [Selection(torch.arange(b["labels"].shape[0]), response_mask_of(b)) for b in batches]
        return Decision.over(batches, selections, 1.0, {"samples": n, "kept": n, "seen": self.seen})

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_method_state_is_saved_with_checkpoints_and_restored_on_resume(tiny_run_inputs, tmp_path, toy_method):
    toy_method("counter", Counter)
    out = tmp_path / "run"
    run_train(train_config(tiny_run_inputs, out, method="counter", max_steps=2, save_steps=1))
    assert json.loads((out / "checkpoint-2" / "qtune-method-state.json").read_text()) == {"states": [{"seen": 2}]}
    run_train(train_config(tiny_run_inputs, out, method="counter", max_steps=3, save_steps=1, resume=True,
                           allow_config_change="max_steps"))
    assert [r["seen"] for r in read_step_log(out / "steps.jsonl")] == [1, 2, 3]  # not 1 again


# --- static selection ----------------------------------------------------------------------------


def dataset_scores(n=20, seed=0) -> DatasetScores:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    nll = [(torch.rand(k, generator=g) * 4).tolist() for k in lengths]
    ppl = [float(torch.tensor(x).mean().exp()) for x in nll]
    ent = torch.rand(n, generator=g).tolist()
    return DatasetScores(sample_id=list(range(100, 100 + n)), n_response=lengths, ppl=ppl, ent=ent,
                         token_nll=nll, token_entropy=None, seconds=0.0, tokens=0)


def test_static_selection_of_full_and_random():
    scores = dataset_scores()
    full = build_method("full", config()).select_dataset(scores)
    assert full.sample_ids == scores.sample_id and all(all(m) for m in full.token_masks.values())
    chosen = build_method("random", config(r_sample=0.3, r_token=0.5, seed=1)).select_dataset(scores)
    assert len(chosen.sample_ids) == keep_count(0.3, 20) and chosen.sample_ids == sorted(chosen.sample_ids)
    for sid in chosen.sample_ids:
        n = scores.n_response[scores.sample_id.index(sid)]
        assert len(chosen.token_masks[sid]) == n and sum(chosen.token_masks[sid]) == keep_count(0.5, n)
    again = build_method("random", config(r_sample=0.3, r_token=0.5, seed=1)).select_dataset(scores)
    assert again == chosen


def test_static_selection_of_qtuning_is_triage_over_the_dataset():
    scores = dataset_scores()
    method = build_method("qtuning", config(r_sample=0.3, r_token=0.5))
    chosen = method.select_dataset(scores)
    decision = triage(torch.tensor(scores.ppl), torch.tensor(scores.ent), 0.3)
    assert chosen.sample_ids == [scores.sample_id[i] for i in decision.keep.tolist()]
    for i in decision.keep.tolist():
        mask = chosen.token_masks[scores.sample_id[i]]
        if decision.prune_tokens[i]:
            nll = torch.tensor(scores.token_nll[i])[None]
            expected = prune_tokens(token_perplexity(nll), torch.ones_like(nll, dtype=torch.bool), 0.5)
            assert mask == expected[0].tolist()
        else:
            assert all(mask)  # Q4 keeps every token
    with pytest.raises(QTuneError, match="needs per-token scores"):
        method.select_dataset(dataclasses.replace(scores, token_nll=None))


def test_kept_token_masks_name_each_kept_response_token_in_order():
    from qtune.step import kept_token_masks

    batch = make_batch([7, 5, 6], prompt=3)  # response tokens: 4, 2, 3
    response = response_mask_of(batch)
    label_mask = response.clone()
    label_mask[0, 4] = False  # row 0 drops its 2nd response token
    label_mask[2] = False  # row 2 keeps none: trained on nothing, so not in the log
    masks = kept_token_masks([batch], [Selection(torch.tensor([0, 2]), label_mask)])
    assert masks == {"0": "1011"}


def test_a_step_logs_its_token_masks_only_when_asked_and_they_count_its_loss_tokens():
    batches = [make_batch([9, 12, 7, 11]), make_batch([8, 10, 6], seed=1)]
    method = build_method("random", config(r_sample=0.5, r_token=0.5))
    plain = plan_step(batches, None, method, 0, pad_token_id=0)
    assert "kept_token_masks" not in plain.record
    logged = plan_step(batches, None, method, 0, pad_token_id=0, log_token_masks=True).record
    masks = logged["kept_token_masks"]
    assert sorted(map(int, masks)) == sorted(logged["kept_ids"])
    assert sum(m.count("1") for m in masks.values()) == logged["kept_tokens"]
    n_response = {int(i): int(n) for b in batches for i, n in zip(b["sample_id"], response_mask_of(b).sum(1))}
    assert all(len(m) == n_response[int(i)] for i, m in masks.items())

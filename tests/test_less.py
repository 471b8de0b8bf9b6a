"""The `less` selector: Adam preconditioning, the seeded block projection, subtasks, and the
whole selector on the tiny model (a training sample identical to the target scores highest)."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from test_train import tiny_run_inputs  # noqa: F401 (a fixture)

from qtune.config import SelectConfig
from qtune.errors import QTuneError
from qtune.pruning import keep_count
from qtune.selection import run_select
from qtune.selectors import less
from qtune.selectors.less import target_tasks, adam_direction, project


def test_adam_direction_on_a_hand_computed_case():
    """m = 0.1, v = 0.01 after one step, gradient 0.5 (betas 0.9, 0.999, eps 1e-8):
    m' = 0.9 x 0.1 + 0.1 x 0.5 = 0.14, v' = 0.999 x 0.01 + 0.001 x 0.25 = 0.01024; the next step is
    the second: m' / (1 - 0.9^2) = 0.14 / 0.19 = 0.736842, v' / (1 - 0.999^2) = 0.01024 / 0.001999
    = 5.122561, whose root is 2.263307; direction 0.736842 / 2.263307 = 0.325560.
    From zero moments (step 0) the direction of g is g / (|g| + eps): -2 gives -1."""
    got = adam_direction(torch.tensor([0.5]), torch.tensor([0.1]), torch.tensor([0.01]), 1)
    assert got.item() == pytest.approx(0.3255599, rel=1e-6)
    assert adam_direction(torch.tensor([-2.0]), torch.zeros(1), torch.zeros(1), 0).item() == pytest.approx(-1.0)


def test_adam_direction_is_the_update_adamw_makes():
    """After two real AdamW steps, the direction of a third gradient is the step AdamW then takes
    (lr 1, no weight decay), for every row of a batch of candidate gradients."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6))
    optimizer = torch.optim.AdamW([weight], lr=1.0, weight_decay=0.0)
    for _ in range(2):
        weight.grad = torch.randn(6)
        optimizer.step()
    state = optimizer.state[weight]
    candidates = torch.randn(3, 6)
    directions = adam_direction(candidates, state["exp_avg"], state["exp_avg_sq"], int(state["step"]))
    before = weight.detach().clone()
    weight.grad = candidates[1].clone()
    optimizer.step()
    torch.testing.assert_close(before - weight.detach(), directions[1])


def test_the_projection_is_seeded_block_by_block_and_independent_of_the_buffer(monkeypatch):
    """With blocks of 10 rows of R (P = 35: four blocks, the last of 5), R is +-1, fixed by the seed,
    and a row's projection does not depend on the rows projected with it."""
    monkeypatch.setattr(less, "BLOCK_FLOATS", 10 * 16)
    torch.manual_seed(0)
    rows = torch.randn(5, 35)
    matrix = project(torch.eye(35), 16, seed=3)  # R itself
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(project(rows, 16, seed=3), rows @ matrix)
    torch.testing.assert_close(torch.cat([project(rows[:2], 16, seed=3), project(rows[2:], 16, seed=3)]),
                               project(rows, 16, seed=3))
    assert torch.equal(project(rows, 16, seed=3), project(rows, 16, seed=3))
    assert not torch.equal(project(rows, 16, seed=4), project(rows, 16, seed=3))
    assert not torch.equal(matrix[:10], matrix[10:20])  # every block is its own draw


def test_subtasks_come_from_a_metadata_field():
    index, names = target_tasks([{"task": "b"}, {"task": "a"}, {"task": "b"}], "task")
    assert index.tolist() == [1, 0, 1] and names == ["a", "b"]
    assert target_tasks([{}, {}], None)[1] == ["all"]
    with pytest.raises(QTuneError, match="--less-target-field 'task': 1 target records have no metadata"):
        target_tasks([{"task": "a"}, {}], "task")


def test_less_keeps_the_exact_count_and_ranks_the_targets_twin_first(tiny_run_inputs, tmp_path):
    """Target: one record of the training set itself. Its twin among the training samples scores
    highest (its Adam direction is the closest to the target's gradient); keep_count(0.25, 48) = 12
    are kept; every score is a weighted mean of cosines, in [-1, 1]."""
    model, data = tiny_run_inputs
    lines = data.read_text().splitlines()
    twin = 7
    (tmp_path / "target.jsonl").write_text(lines[twin] + "\n")
    options = dict(model=str(model), data=str(data), selector="less", ratio=0.25, plot=False, less_lora_r=4,
                   less_dim=256, less_epochs=2, less_fraction=0.5, less_lr=1e-2)
    with pytest.raises(QTuneError, match="the less selector needs --target-data"):
        run_select(SelectConfig(out=str(tmp_path / "none"), **options))
    summary = run_select(SelectConfig(out=str(tmp_path / "out"), target_data=str(tmp_path / "target.jsonl"),
                                      **options))
    assert summary["n_kept"] == keep_count(0.25, len(lines)) == 12
    assert summary["stats"]["checkpoints"] == 2 and summary["stats"]["target_samples"] == 1
    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pydict()
    best = max(range(len(lines)), key=lambda i: table["score"][i])
    assert table["sample_id"][best] == twin
    assert all(-1 <= s <= 1 for s in table["score"]) and table["kept"][best]
    kept = [json.loads(line) for line in (tmp_path / "out" / "selected.jsonl").read_text().splitlines()]
    assert len(kept) == 12 and json.loads(lines[twin]) in kept


class _Share(less.Processes):
    """Process `rank` of `world` without a process group: its gradients are left as its own."""

    def sum_gradients(self, params):
        pass


def test_a_warm_up_steps_shares_sum_to_the_whole_steps_gradient(tiny_run_inputs):
    """The warm-up step shared by 3 processes (`step_gradient`): each runs every third of 5 rows,
    its summed token loss divided by all 5 rows' tokens; the three shares' gradients, summed (what
    `Processes.sum_gradients` does), are the gradient one process computes on the 5 rows, to
    float32 rounding (each share is padded to its own longest row). A gradient left in the weights
    (a gradient pass's last sample, between two epochs) is not added to the step's: it was, before
    the step cleared it. After the adapters' scope the model is as it was: the same weights, no
    adapter, the same requires_grad and mode."""
    from qtune.config import SelectConfig
    from qtune.workflows import load_for_scoring

    model_dir, data = tiny_run_inputs
    cfg = SelectConfig(model=str(model_dir), data=str(data), out="unused", selector="less")
    _, pad, _, samples, model = load_for_scoring(cfg, with_model=True, device="cpu")
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    training = model.training
    rows = [samples[i] for i in (0, 3, 9, 17, 30)]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the shares' padding differs from the whole's
    with less.warm_up_adapters(model, r=4, target=cfg.less_lora_target, seed=0) as (peft_model, params):
        with torch.no_grad():
            for p in params:  # B away from 0, so that every adapter weight has a gradient
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        peft_model.train()
        for p in params:
            p.grad = torch.ones_like(p)  # left over
        less.step_gradient(peft_model, params, rows, less.Processes(), pad_token_id=pad)
        whole = [p.grad.clone() for p in params]
        summed = [torch.zeros_like(p) for p in params]
        for rank in range(3):
            peft_model.zero_grad(set_to_none=True)
            less.step_gradient(peft_model, params, rows, _Share(rank=rank, world=3), pad_token_id=pad)
            for total, p in zip(summed, params):
                total += p.grad
    scale = max(g.abs().max().item() for g in whole)
    assert scale > 0
    for total, g in zip(summed, whole):
        assert torch.allclose(total, g, rtol=1e-5, atol=1e-6 * scale)
    after = dict(model.named_parameters())
    assert sorted(after) == sorted(before) and not any("lora" in name for name in after)
    for name, (weight, flag) in before.items():
        assert torch.equal(after[name], weight) and after[name].requires_grad == flag and after[name].grad is None
    assert model.training == training


def test_select_help_lists_less_and_its_options(capsys):
    from qtune.cli import main

    with pytest.raises(SystemExit) as info:
        main(["select", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "less (gradient similarity" in " ".join(text.split())
    assert all(flag in text for flag in ("--target-data", "--less-fraction", "--less-epochs", "--less-lora-r",
                                         "--less-lr", "--less-dim", "--less-target-field"))

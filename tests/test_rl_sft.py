"""SFT inside RL (`qtune rl --sft-weight`, CHORD; `--interleave-sft`, ReLIFT): the maths by hand on
small tensors (`qtune.rl.sft_mix`), the options at the boundary, short real runs on the tiny testbed
of tests/test_rl.py, and the interleaved SFT decisions of 2 processes against 1.

The tiny model answers nothing right, so the runs use `odd_ids_wrong`, a reward that calls every
completion of an odd-numbered prompt wrong (0) and every other one right (above 0): the all-wrong
groups are then known in advance, whatever the model samples."""

import json
import math

import pytest
import torch
from test_distributed import RL_WORKER, launch
from test_rl import rl_config, testbed  # noqa: F401 (testbed is a fixture)

from qtune.data import IGNORE_INDEX
from qtune.errors import OptionError, QTuneError
from qtune.rl import run_rl
from qtune.rl.sft_mix import (
    SFTMix, all_wrong_groups, chord_loss, expert_positions, expert_token_nll, process_share, sft_weight_at,
    token_weights, weighted_nll_sum,
)
from qtune.train import read_step_log

#: The sample ids of the groups the reward functions scored in this process, call by call.
SCORED: list[list[int]] = []


def odd_ids_wrong(completions, sample_id, **kwargs):
    """0 (wrong) for every completion of an odd-numbered prompt; 1 + length / 100 (right, with
    spread) for the others."""
    SCORED.append(list(sample_id))
    return [0.0 if s % 2 else 1.0 + len(c) / 100 for c, s in zip(completions, sample_id)]


# --- the maths ----------------------------------------------------------------------------------


def test_the_chord_sft_term_and_its_gradient_match_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.5, 1.5, 0.0], [0.3, -0.2, 0.1]]],
                          requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 0, 2, IGNORE_INDEX]])  # position t predicts label t + 1
    # By hand: positions 0 and 1 predict tokens 0 and 2; position 2 predicts nothing (ignored).
    rows = [(logits[0, 0].tolist(), 0), (logits[0, 1].tolist(), 2)]
    probs = [math.exp(z[k]) / sum(math.exp(v) for v in z) for z, k in rows]
    nll = expert_token_nll(logits, labels)
    assert nll.tolist() == pytest.approx([-math.log(p) for p in probs], rel=1e-6)

    plain = weighted_nll_sum(nll, "none") / nll.numel()
    assert plain.item() == pytest.approx(sum(-math.log(p) for p in probs) / 2, rel=1e-6)
    phi = [p * (1 - p) for p in probs]
    assert token_weights(nll, "p(1-p)").tolist() == pytest.approx(phi, rel=1e-6)
    loss = weighted_nll_sum(nll, "p(1-p)") / nll.numel()
    assert loss.item() == pytest.approx(sum(w * -math.log(p) for w, p in zip(phi, probs)) / 2, rel=1e-6)

    # phi is a constant of the gradient: d loss / d z_t = phi_t (softmax(z_t) - onehot) / n at the
    # two predicting positions, 0 elsewhere.
    (grad,) = torch.autograd.grad(loss, logits)
    expected = torch.zeros_like(logits)
    for t, (z, k) in enumerate(rows):
        onehot = torch.nn.functional.one_hot(torch.tensor(k), 3).float()
        expected[0, t] = phi[t] * (torch.softmax(torch.tensor(z), -1) - onehot) / 2
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)

    grpo = torch.tensor(0.8)
    assert chord_loss(grpo, loss, 0.25).item() == pytest.approx(0.75 * 0.8 + 0.25 * loss.item())


def test_the_sft_weight_schedules_at_chosen_steps():
    assert [sft_weight_at(t, 0.3, "constant", 0.05, 10) for t in (0, 5, 50)] == [0.3, 0.3, 0.3]
    # CHORD-mu as the authors' released configuration sets it: 0.9 down to 0.05 over 200 steps, then 0.05.
    decay = [sft_weight_at(t, 0.9, "decay", 0.05, 200) for t in (0, 50, 100, 200, 300)]
    assert decay == pytest.approx([0.9, 0.05 + 0.85 * (1 + math.cos(math.pi / 4)) / 2, 0.475, 0.05, 0.05])
    mix = SFTMix(weight=0.5, schedule="decay", floor=0.1)
    assert [mix.weight_at(t, 3) for t in range(3)] == pytest.approx([0.5, 0.4, 0.2])  # over max_steps = 3
    with pytest.raises(ValueError, match="unknown schedule"):
        sft_weight_at(0, 0.5, "linear", 0.0, 10)


def test_only_the_groups_whose_every_rollout_is_wrong_are_collected():
    nan = float("nan")
    correctness = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],  # all wrong
        [1.0, 1.0, 1.0, 1.0],  # all right: not collected
        [0.0, 1.0, 0.0, 0.0],  # mixed
        [0.0, nan, 0.0, 0.0],  # one rollout unscored: not known to be all wrong
        [-1.0, 0.0, -0.5, 0.0],  # a -1/+1 style reward: wrong is <= 0
        [0.0, 0.0, 0.0, 1e-6],  # one barely right
    ])
    assert all_wrong_groups(correctness, [10, 11, 12, 13, 14, 15]) == [10, 14]
    with pytest.raises(ValueError, match="6 groups of rewards for 5 sample ids"):
        all_wrong_groups(correctness, [1, 2, 3, 4, 5])


def test_expert_draws_walk_through_seeded_epochs_and_process_shares_line_up():
    first = [p for draw in range(5) for p in expert_positions(10, 2, draw, seed=3)]
    assert sorted(first) == list(range(10))  # one epoch: every demonstration once
    second = [p for draw in range(5, 10) for p in expert_positions(10, 2, draw, seed=3)]
    assert sorted(second) == list(range(10)) and second != first
    assert expert_positions(10, 3, 3, seed=3) == first[9:10] + second[:2]  # across the epoch boundary
    assert expert_positions(10, 2, 7, seed=3) == expert_positions(10, 2, 7, seed=3)

    ids = [5, 9, 1, 7, 3]
    assert process_share(ids, 2, 0, 2) == [[5, 1], [3]]
    assert process_share(ids, 2, 1, 2) == [[9, 7], []]  # as many micro-batches as process 0
    assert process_share(ids, 1, 0, 8) == [ids]


# --- the options --------------------------------------------------------------------------------


def test_the_options_are_checked_at_the_boundary(testbed, tmp_path):
    with pytest.raises(OptionError, match=r"sft_weight must be in \[0, 1\]; got 1.5"):
        rl_config(testbed, tmp_path, sft_weight=1.5)
    with pytest.raises(OptionError, match="sft_weight must be above 0 when sft_token_weight is set"):
        rl_config(testbed, tmp_path, sft_token_weight="p(1-p)")
    with pytest.raises(OptionError, match=r"sft_weight_floor must be at most sft_weight \(0.1\)"):
        rl_config(testbed, tmp_path, sft_weight=0.1, sft_weight_schedule="decay", sft_weight_floor=0.2)
    with pytest.raises(OptionError, match="sft_weight_schedule must be one of constant, decay"):
        rl_config(testbed, tmp_path, sft_weight=0.1, sft_weight_schedule="entropy")
    with pytest.raises(OptionError, match="interleave_sft_reward must be one of the run's rewards"):
        rl_config(testbed, tmp_path, interleave_sft=True, rewards=("answer_format",))
    with pytest.raises(OptionError, match="interleave_sft must be off under DeepSpeed or FSDP"):
        rl_config(testbed, tmp_path, interleave_sft=True, rewards=("exact_match",), fsdp="full_shard")
    # Records whose prompt fills sft_max_length leave no demonstration: stopped before training.
    with pytest.raises(QTuneError, match="no expert demonstration .* raise --sft-max-length"):
        run_rl(rl_config(testbed, tmp_path / "short", sft_weight=0.5, sft_max_length=4))


def test_the_pipeline_takes_the_options_in_its_rl_section(testbed, tmp_path):
    from qtune.pipeline import PipelineConfig, stage_configs

    values = dict(out=str(tmp_path / "p"), model=str(testbed.model_dir), data=str(testbed.train_path))
    cfg = PipelineConfig(**values, rl={"sft_weight": 0.3, "sft_weight_schedule": "decay", "interleave_sft": True})
    rl = next(s.config for s in stage_configs(cfg) if s.name == "rl")
    assert (rl.sft_weight, rl.sft_weight_schedule, rl.interleave_sft) == (0.3, "decay", True)
    assert rl.interleave_sft_batch == 64
    with pytest.raises(QTuneError, match=r"pipeline: rl: sft_weight must be in \[0, 1\]; got -0.5"):
        PipelineConfig(**values, rl={"sft_weight": -0.5})


# --- real runs ----------------------------------------------------------------------------------


def test_chord_runs_and_logs_its_term(testbed, tmp_path):
    out = tmp_path / "chord"
    run_rl(rl_config(testbed, out, max_steps=3, rewards=("test_rl:text_length",), sft_weight=0.5,
                     sft_weight_schedule="decay", sft_weight_floor=0.1, sft_token_weight="p(1-p)"))
    rows = read_step_log(out / "steps.jsonl")
    assert [r["sft_weight"] for r in rows] == pytest.approx([0.5, 0.4, 0.2])  # decay over the 3 steps
    assert all(0 < r["sft_loss"] < math.inf for r in rows)

    # With mu = 1 the GRPO term has no weight: the loss the Trainer logs is the SFT term's.
    pure = tmp_path / "pure-sft"
    run_rl(rl_config(testbed, pure, max_steps=2, rewards=("test_rl:text_length",), sft_weight=1.0))
    for row in read_step_log(pure / "steps.jsonl"):
        assert row["sft_weight"] == 1.0 and row["loss"] == pytest.approx(row["sft_loss"], abs=1e-4)


def expected_sft_steps(scored: list[list[int]], group_size: int, batch: int) -> list[list[int]]:
    """The interleaved SFT steps that the scored groups call for, step by step, by the rule: collect
    the odd (all-wrong) ids not already waiting; when batch or more wait, train on them and empty."""
    steps, waiting = [], []
    for ids in scored:
        waiting += [s for s in ids[::group_size] if s % 2 and s not in waiting]
        steps.append(waiting if len(waiting) >= batch else None)
        waiting = [] if len(waiting) >= batch else waiting
    return steps


def test_interleaved_sft_collects_the_all_wrong_groups_and_trains_on_them(testbed, tmp_path):
    out = tmp_path / "relift"
    SCORED.clear()
    summary = run_rl(rl_config(testbed, out, max_steps=4, save_steps=1, rewards=("test_rl_sft:odd_ids_wrong",),
                               interleave_sft=True, interleave_sft_reward="test_rl_sft:odd_ids_wrong",
                               interleave_sft_batch=2))
    rows = read_step_log(out / "steps.jsonl")
    assert len(SCORED) == len(rows) == 4  # one generation round per step
    for row, ids, trained in zip(rows, SCORED, expected_sft_steps(SCORED, 4, 2)):
        groups = ids[::4]
        assert row["all_wrong_ids"] == [s for s in groups if s % 2]
        assert row["all_wrong_groups"] == len(row["all_wrong_ids"])
        if trained is None:
            assert "interleaved_sft_ids" not in row and "interleaved_sft_loss" not in row
        else:
            assert row["interleaved_sft_ids"] == trained and row["interleaved_sft_records"] == len(trained)
            assert 0 < row["interleaved_sft_loss"] < math.inf
    assert summary["interleaved_sft_steps"] == sum("interleaved_sft_ids" in r for r in rows) >= 1
    # The buffer left after the last step is in its checkpoint, for a resume.
    waiting = json.loads((out / "checkpoint-4" / "qtune-sft-buffer.json").read_text())["buffer"]
    assert len(waiting) == rows[-1]["sft_buffer"]


def test_a_resumed_run_keeps_the_buffer_and_the_expert_draws(testbed, tmp_path, monkeypatch):
    """Killed after checkpoint 2 of 4 with one all-wrong record waiting, then resumed: the buffer
    comes back from the checkpoint and CHORD draws the demonstrations the whole run drew."""
    from test_rl import weights

    from qtune.rl.trainer import QTuneGRPOTrainer

    settings = dict(max_steps=4, save_steps=1, rewards=("test_rl_sft:odd_ids_wrong",), interleave_sft=True,
                    interleave_sft_reward="test_rl_sft:odd_ids_wrong", interleave_sft_batch=3, sft_weight=0.3)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_rl(rl_config(testbed, whole, **settings))
    save = QTuneGRPOTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(QTuneGRPOTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_rl(rl_config(testbed, killed, **settings))
    monkeypatch.undo()
    waiting = json.loads((killed / "checkpoint-2" / "qtune-sft-buffer.json").read_text())["buffer"]
    run_rl(rl_config(testbed, killed, resume=True, **settings))

    rows, resumed = read_step_log(whole / "steps.jsonl"), read_step_log(killed / "steps.jsonl")
    assert len(waiting) == rows[1]["sft_buffer"] > 0  # records were waiting at the kill
    fields = ("all_wrong_ids", "interleaved_sft_ids", "sft_buffer")
    assert [{k: r.get(k) for k in fields} for r in resumed] == [{k: r.get(k) for k in fields} for r in rows]
    assert [r["sft_loss"] for r in resumed] == pytest.approx([r["sft_loss"] for r in rows], rel=1e-4)
    reference, end = weights(whole / "model"), weights(killed / "model")
    assert all(torch.allclose(reference[k], end[k], atol=1e-6) for k in reference)


def test_two_processes_take_the_interleaved_sft_decisions_of_one(testbed, tmp_path):
    """The same global batch of 4 prompts a step, in 1 process (16 completions) and in 2 (8 each):
    each process scores only its own prompts, so the buffer is the same only if each process
    gathers the other's all-wrong prompts. CHORD runs alongside, under DDP."""
    settings = dict(max_steps=4, rewards=("test_rl_sft:odd_ids_wrong",), interleave_sft=True,
                    interleave_sft_reward="test_rl_sft:odd_ids_wrong", interleave_sft_batch=3, sft_weight=0.2)
    one, two = tmp_path / "one", tmp_path / "two"
    launch(tmp_path, rl_config(testbed, one, batch_size=16, **settings), 1, RL_WORKER)
    launch(tmp_path, rl_config(testbed, two, batch_size=8, **settings), 2, RL_WORKER)
    rows_one, rows_two = read_step_log(one / "steps.jsonl"), read_step_log(two / "steps.jsonl")
    fields = ("all_wrong_ids", "interleaved_sft_ids", "interleaved_sft_records", "sft_buffer")
    assert [{k: r.get(k) for k in fields} for r in rows_two] == [{k: r.get(k) for k in fields} for r in rows_one]
    assert any("interleaved_sft_ids" in r for r in rows_two)
    assert all(0 < r["sft_loss"] < math.inf and "interleaved_sft_loss" in r for r in rows_two
               if "interleaved_sft_ids" in r)

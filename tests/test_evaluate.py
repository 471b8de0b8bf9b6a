"""Answer extraction (as lm-evaluation-harness's gsm8k task) and batched greedy generation."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from qtune import evaluate
from qtune.data import Record
from qtune.errors import QTuneError
from qtune.evaluate import (
    EvalConfig,
    build_prompts,
    end_of_turn,
    evaluate_exact_match,
    extract_flexible,
    extract_strict,
    generate,
    gold_answer,
    is_correct,
    lm_eval_model,
    normalize_number,
    write_eval_outputs,
)

GSM8K_DIR = Path(__file__).parents[1] / "../shared/data/gsm8k"

# (output, strict-match, flexible-extract), None where the harness reports "[invalid]". The
# expected values are what lm-eval 0.4.13's RegexFilter gives with the gsm8k.yaml patterns
# "#### (\-?[0-9\.\,]+)" (first match) and "(-?[$0-9.,]{2,})|(-?[0-9]+)" (group_select=-1).
EXTRACTION_CASES = [
    ("The answer is 42.", None, "42."),
    ("#### 72", "72", "72"),
    ("so 5 + 3 = 8\n#### 8", "8", "8"),
    ("#### -3", "-3", "-3"),
    ("-5 degrees", None, "-5"),
    ("- 7", None, "7"),
    ("It costs $18.", None, "$18."),
    ("#### $18", None, "$18"),
    ("1,000 apples\n#### 1,000", "1,000", "1,000"),
    ("the total is $1,234.50.", None, "$1,234.50."),
    ("3.5 hours", None, "3.5"),
    ("#### 3.0", "3.0", "3.0"),
    ("#### .5", ".5", ".5"),
    ("first 7 then 12 then 9", None, "9"),
    ("#### 4 and #### 5", "4", "5"),
    ("#### 12\n\n#### 13", "12", "13"),
    ("#### 72.\nQuestion: 5", "72.", "5"),
    ("x is 5. y is 6..", None, "6.."),
    ("hello...", None, "..."),
    ("answer: 2/3", None, "3"),
    ("It is 10%.", None, "10"),
    ("1e5", None, "5"),
    ("no answer here", None, None),
    ("", None, None),
]


@pytest.mark.parametrize("text, strict, flexible", EXTRACTION_CASES)
def test_extractors_match_the_harness(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("1,000", "1000"),
        ("$18.", "18"),
        ("$1,234.50.", "1234.50"),
        ("6..", "6."),  # only one trailing period goes
        ("Step 1: 2 #### 3 #### 1,234", "1234"),  # everything up to the last "#### "
        ("multi\nline\n#### 7", "7"),
        ("NaN", "nan"),
        ("-3", "-3"),
    ],
)
def test_normalize_number(raw, normalised):
    assert normalize_number(raw) == normalised


@pytest.mark.parametrize(
    "output, gold, strict_ok, flexible_ok",
    [
        ("The answer is 42.", "42", False, True),
        ("It costs $18.", "18", False, True),
        ("#### $18", "18", False, True),
        ("Work...\n#### 1,000", "1000", True, True),
        ("#### 3.0", "3", False, False),  # compared as strings, not as numbers
        ("x is 5. y is 6..", "6", False, False),
        ("#### 72.\nQuestion: 5", "72", True, False),
        ("nothing", "7", False, False),
    ],
)
def test_is_correct_per_filter(output, gold, strict_ok, flexible_ok):
    assert is_correct(extract_strict(output), gold) is strict_ok
    assert is_correct(extract_flexible(output), gold) is flexible_ok


def test_gold_answer():
    assert gold_answer("She makes 9 * 2 = $<<9*2=18>>18 a day.\n#### 18") == "18"
    assert gold_answer("It costs 1,200 + 34 = 1,234 dollars.\n#### 1,234") == "1234"
    assert gold_answer("#### -5\n") == "-5"
    assert gold_answer("72") == "72"  # no "#### ": the whole answer, as the harness does
    assert is_correct(None, "18") is False


def _gsm8k_lines(split: str) -> list[dict]:
    path = GSM8K_DIR / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_gold_answer_on_real_gsm8k():
    rows = _gsm8k_lines("test")
    assert gold_answer(rows[0]["answer"]) == "18"  # Janet's ducks
    for row in rows:
        gold = gold_answer(row["answer"])
        assert gold == row["answer"].split("#### ")[-1].replace(",", "")
        assert gold.lstrip("-").isdigit()
        # A model that wrote the reference solution verbatim is right under both filters.
        assert is_correct(extract_strict(row["answer"]), gold)
        assert is_correct(extract_flexible(row["answer"]), gold)


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


PROMPTS = [
    "Tom has 3 apples.",
    "How",
    "Ann buys 12 cats and sells 5 dogs each day; how many are left after 3 days? Answer:",
    "What is 7 + 8?",
    "The total cost is $3.5 per hour for 4 hours, so",
]


def test_batched_generation_equals_one_by_one(tiny_model, tiny_tokenizer):
    batched = generate(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=8, batch_size=3, progress=False)
    single = [
        generate(tiny_model, tiny_tokenizer, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in PROMPTS
    ]
    assert batched == single
    assert len(set(batched)) > 1 and all(batched)


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model, tiny_tokenizer):
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    prompts = PROMPTS[:2]
    with_pad = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert generate(tiny_model, no_pad, prompts, max_new_tokens=4, batch_size=2, progress=False) == with_pad


def test_generation_matches_plain_greedy_loop(tiny_model, tiny_tokenizer):
    # Reference without generate(): argmax of a full forward pass, token by token.
    ids = tiny_tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])
    for _ in range(6):
        with torch.no_grad():
            next_id = tiny_model(tokens).logits[0, -1].argmax()
        tokens = torch.cat([tokens, next_id.view(1, 1)], dim=1)
    expected = tiny_tokenizer.decode(tokens[0, len(ids) :], skip_special_tokens=True)
    got = generate(tiny_model, tiny_tokenizer, [PROMPTS[2], PROMPTS[1]], max_new_tokens=6, batch_size=2, progress=False)
    assert got[0] == expected


def test_stop_string_truncates(tiny_model, tiny_tokenizer):
    prompt = PROMPTS[0]
    full = generate(tiny_model, tiny_tokenizer, [prompt], max_new_tokens=24, batch_size=1, progress=False)[0]
    assert len(full) >= 8
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = generate(
        tiny_model, tiny_tokenizer, [prompt, PROMPTS[2]], max_new_tokens=24, batch_size=2, stop=(stop,), progress=False
    )[0]
    assert cut == full[: full.index(stop)]


def test_special_token_stop_ends_generation(tiny_model, tiny_tokenizer):
    end_id = tiny_tokenizer.convert_tokens_to_ids("<|end|>")
    steps = []

    def always_end(module, args, output):
        output[..., end_id] = 1e4  # the model now emits <|end|> at every step
        return output

    hooks = [
        tiny_model.lm_head.register_forward_hook(always_end),
        tiny_model.model.register_forward_hook(lambda *args: steps.append(1)),
    ]
    try:
        stopped = generate(
            tiny_model, tiny_tokenizer, ["What"], max_new_tokens=10, batch_size=1, stop=("<|end|>",), progress=False
        )[0]
        n_stopped = len(steps)
        steps.clear()
        unstopped = generate(tiny_model, tiny_tokenizer, ["What"], max_new_tokens=10, batch_size=1, progress=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert stopped == unstopped == ""  # special tokens never reach the text
    assert n_stopped == 1  # ended right after the first token, as an EOS would
    assert len(steps) == 10


def test_end_of_turn(tiny_tokenizer, plain_tokenizer):
    assert end_of_turn(tiny_tokenizer) == "<|end|>"
    assert end_of_turn(plain_tokenizer) == "</s>"  # the plain template ends answers with EOS


# ----------------------------------------------------------------------------- prompts and evaluation


def _records(n: int, offset: int = 0) -> list[Record]:
    return [
        Record(
            sample_id=i,
            messages=[
                {"role": "user", "content": f"Q{i + offset}: what is {i} + {i}?"},
                {"role": "assistant", "content": f"{i} + {i} = {2 * i}\n#### {2 * i}"},
            ],
            metadata={"source": "unit", "index": i},
        )
        for i in range(n)
    ]


def test_build_prompts_zero_shot(tiny_tokenizer, plain_tokenizer):
    record = _records(2)[1]
    assert build_prompts([record], tiny_tokenizer) == ["<s><|user|>Q1: what is 1 + 1?<|end|><|assistant|>"]
    assert build_prompts([record], plain_tokenizer) == ["<s>User: Q1: what is 1 + 1?\nAssistant: "]


def test_build_prompts_few_shot(tiny_tokenizer):
    targets = _records(3)
    pool = _records(6, offset=100) + targets[:1]  # the pool holds target 0 itself
    prompts = build_prompts(targets, tiny_tokenizer, num_fewshot=3, fewshot_records=pool, seed=7)
    assert prompts == build_prompts(targets, tiny_tokenizer, num_fewshot=3, fewshot_records=pool, seed=7)
    assert prompts != build_prompts(targets, tiny_tokenizer, num_fewshot=3, fewshot_records=pool, seed=8)
    for target, prompt in zip(targets, prompts):
        question, answer = (m["content"] for m in target.messages)
        assert prompt.count("<|user|>") == 4 and prompt.count("<|assistant|>") == 4
        assert prompt.endswith(f"<|user|>{question}<|end|><|assistant|>")
        assert prompt.count(question) == 1 and answer not in prompt
    with pytest.raises(QTuneError):
        build_prompts(targets, tiny_tokenizer, num_fewshot=3, fewshot_records=pool[:2])


def test_system_message_comes_before_the_shots(tiny_tokenizer):
    target = Record(
        sample_id=0,
        messages=[{"role": "system", "content": "Be brief."}, *_records(1)[0].messages],
    )
    prompt = build_prompts([target], tiny_tokenizer, num_fewshot=1, fewshot_records=_records(2, offset=50)[1:])[0]
    assert prompt.startswith("<s><|system|>Be brief.<|end|><|user|>Q51")


def test_record_without_reference_is_rejected(tiny_tokenizer):
    record = Record(sample_id=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(QTuneError, match="sample 4"):
        build_prompts([record], tiny_tokenizer)


def test_evaluate_exact_match_scores_both_filters(monkeypatch, tiny_tokenizer):
    outputs = ["2 + 2 = 4\n#### 4", "so it is 6.", "no idea", "#### 0"]
    seen = {}

    def scripted_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, stop, progress):
        seen.update(prompts=prompts, stop=stop, max_new_tokens=max_new_tokens)
        return outputs[: len(prompts)]

    monkeypatch.setattr(evaluate, "generate", scripted_generate)
    records = _records(5)[2:] + _records(1)  # golds 4, 6, 8, 0
    config = EvalConfig(max_new_tokens=9, limit=4, stop=("Question:",))
    metrics, predictions = evaluate_exact_match(None, tiny_tokenizer, records, config, progress=False)

    assert metrics["n"] == 4
    assert metrics["exact_match_strict"] == pytest.approx(2 / 4)
    assert metrics["exact_match_flexible"] == pytest.approx(3 / 4)
    assert metrics["invalid_strict"] == pytest.approx(2 / 4)
    assert metrics["invalid_flexible"] == pytest.approx(1 / 4)
    assert metrics["exact_match_strict_stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)
    assert seen["stop"] == ("Question:", "<|end|>") and seen["max_new_tokens"] == 9
    assert [p["prompt"] for p in predictions] == seen["prompts"]
    first = predictions[0]
    assert first["sample_id"] == 2 and first["gold"] == "4" and first["output"] == outputs[0]
    assert first["source"] == "unit" and first["index"] == 2
    assert [p["extracted_strict"] for p in predictions] == ["4", None, None, "0"]
    assert [p["extracted_flexible"] for p in predictions] == ["4", "6.", None, "0"]
    assert [p["correct_flexible"] for p in predictions] == [True, True, False, True]


def test_evaluate_end_to_end_writes_outputs(tmp_path, tiny_model, tiny_tokenizer):
    records = _records(3)
    metrics, predictions = evaluate_exact_match(
        tiny_model, tiny_tokenizer, records, EvalConfig(max_new_tokens=5, batch_size=2), progress=False
    )
    metrics["perplexity"] = 12.5  # the hook: held-out perplexity from qtune.scoring joins here
    write_eval_outputs(tmp_path / "eval", metrics, predictions)

    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["n"] == 3 and written["perplexity"] == 12.5
    assert 0.0 <= written["exact_match_flexible"] <= 1.0
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["sample_id"] for row in rows] == [0, 1, 2]
    assert rows[1]["gold"] == "2" and rows[1]["prompt"].endswith("<|assistant|>")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json", "predictions.jsonl"]


def test_few_shot_needs_records(tiny_tokenizer):
    with pytest.raises(QTuneError, match="few-shot"):
        evaluate_exact_match(None, tiny_tokenizer, _records(2), EvalConfig(num_fewshot=2))


def test_lm_eval_adapter_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(QTuneError, match=r"qtune\[eval\]"):
        lm_eval_model(object(), object())

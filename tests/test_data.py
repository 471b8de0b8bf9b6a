"""Tests of qtune.data: loading every format and file type, rendering, tokenisation, batching."""

from __future__ import annotations

import copy
import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch

from qtune.chat_templates import PLAIN_ASSISTANT_PROMPT, render_prompt, render_segments
from qtune.data import (
    FORMATS,
    IGNORE_INDEX,
    TURN_ID_STRIDE,
    Record,
    collate,
    detect_format,
    length_bucketed_batches,
    load_records,
    record_id_of,
    require_pad_token,
    tokenize_records,
)
from qtune.errors import DataError, QTuneError

GSM8K = Path(__file__).parents[1] / "../shared/data/gsm8k"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# One source row per format, and the conversation each must normalise to.
FORMAT_CASES = {
    "alpaca": (
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be brief."},
        [system("Be brief."), user("Add the numbers.\n\n2 and 3"), assistant("5")],
    ),
    "prompt_completion": ({"prompt": "2 + 3 =", "completion": " 5"}, [user("2 + 3 ="), assistant(" 5")]),
    "question_answer": (
        {"question": "What is 2 + 3?", "answer": "#### 5"},
        [user("What is 2 + 3?"), assistant("#### 5")],
    ),
    "messages": (
        {"messages": [system("Be brief."), user("2 + 3?"), assistant("5"), user("And 4 + 4?"), assistant("8")]},
        [system("Be brief."), user("2 + 3?"), assistant("5"), user("And 4 + 4?"), assistant("8")],
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2 + 3?"},
                           {"from": "gpt", "value": "5"}]},
        [system("Be brief."), user("2 + 3?"), assistant("5")],
    ),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path


def qa_rows(n):
    return [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}",
             "metadata": {"category": "even" if i % 2 == 0 else "odd"}} for i in range(n)]


def labelled_spans(sample):
    """Contiguous runs of trainable token ids."""
    spans, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


# ----------------------------------------------------------------------------- formats and files


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_is_detected_and_normalised(tmp_path, name):
    row, expected = FORMAT_CASES[name]
    path = write_jsonl(tmp_path / "data.jsonl", [row, row])
    assert detect_format(row) == name
    for requested in ("auto", name):
        records, report = load_records(path, requested)
        assert report.format == name
        assert [r.messages for r in records] == [expected, expected]
        assert [r.sample_id for r in records] == [0, 1]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, [user("Say hi."), assistant("hi")]),
        ({"instruction": "Say hi.", "output": "hi", "system": ""}, [user("Say hi."), assistant("hi")]),
        (
            {"prompt": [system("S"), user("2 + 3?")], "completion": [assistant("5")]},
            [system("S"), user("2 + 3?"), assistant("5")],
        ),
        (
            {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]},
            [user("hi"), assistant("hello")],
        ),
    ],
    ids=["alpaca-no-input", "alpaca-empty-system", "trl-conversational", "sharegpt-openai-roles"],
)
def test_format_variants(tmp_path, row, expected):
    records, _ = load_records(write_jsonl(tmp_path / "data.jsonl", [row]))
    assert records[0].messages == expected


def test_unrecognised_fields_name_the_expected_formats(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"data\.jsonl, line 1: cannot detect the format: fields text .*alpaca"):
        load_records(path)


def test_named_format_mismatch_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", qa_rows(3))
    with pytest.raises(DataError, match=r"line 1: format alpaca needs fields instruction, output.*question_answer"):
        load_records(path, "alpaca", skip_invalid=True)
    with pytest.raises(QTuneError, match="unknown data format 'chatml'"):
        load_records(path, "chatml")


def _write_json(path, document):
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _write_dataset_dict(path, rows):
    import datasets

    split = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": split, "test": split.select([0])}).save_to_disk(str(path))
    return path


FILE_WRITERS = {
    "jsonl": lambda tmp, rows: write_jsonl(tmp / "d.jsonl", rows),
    "json-array": lambda tmp, rows: _write_json(tmp / "d.json", rows),
    "json-object": lambda tmp, rows: _write_json(tmp / "d.json", {"version": 1, "data": rows}),
    "parquet": lambda tmp, rows: _write_parquet(tmp / "d.parquet", rows),
    "csv": lambda tmp, rows: write_csv(tmp / "d.csv", rows),
    "datasets": lambda tmp, rows: _write_dataset(tmp / "saved", rows),
    "datasetdict": lambda tmp, rows: _write_dataset_dict(tmp / "saved_dict", rows),
}


@pytest.mark.parametrize("kind", FILE_WRITERS)
def test_every_file_type_loads_the_same_records(tmp_path, kind):
    rows = qa_rows(4)
    path = FILE_WRITERS[kind](tmp_path, rows)
    records, report = load_records(path)
    assert report.format == "question_answer"
    assert (report.n_read, report.n_loaded) == (4, 4)
    assert [r.sample_id for r in records] == [0, 1, 2, 3]
    assert [r.messages for r in records] == [[user(r["question"]), assistant(r["answer"])] for r in rows]
    assert [r.metadata for r in records] == [r["metadata"] for r in rows]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "datasets"])
def test_conversations_load_from_every_file_type(tmp_path, kind):
    row, expected = FORMAT_CASES["messages"]
    records, report = load_records(FILE_WRITERS[kind](tmp_path, [row]))
    assert report.format == "messages"
    assert records[0].messages == expected


def test_datasetdict_without_train_split(tmp_path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(qa_rows(1))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(QTuneError, match="no 'train' split"):
        load_records(tmp_path / "dd")


def test_unknown_extension_missing_path_and_bad_json_shapes(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(QTuneError, match="unknown file type '.txt'"):
        load_records(tmp_path / "d.txt")
    with pytest.raises(QTuneError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")
    (tmp_path / "two.json").write_text(json.dumps({"a": qa_rows(1), "b": qa_rows(1)}))
    with pytest.raises(DataError, match="single list field.*found list fields: a, b"):
        load_records(tmp_path / "two.json")
    (tmp_path / "one.json").write_text(json.dumps(FORMAT_CASES["messages"][0]))
    with pytest.raises(DataError, match="single record"):
        load_records(tmp_path / "one.json")
    (tmp_path / "broken.json").write_text('[\n{"question": "q", "answer": "a"},\n{"question": }\n]')
    with pytest.raises(DataError, match=r"broken\.json, line 3: invalid JSON"):
        load_records(tmp_path / "broken.json")


def test_blank_lines_are_ignored_and_limit_stops_early(tmp_path):
    rows = qa_rows(5)
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(rows[0]) + "\n  \n" + "".join(json.dumps(r) + "\n" for r in rows[1:]) + "\n")
    records, report = load_records(path)
    assert [r.sample_id for r in records] == [0, 1, 2, 3, 4]
    assert report.n_read == 5
    records, report = load_records(path, limit=2)
    assert [r.messages[0]["content"] for r in records] == [rows[0]["question"], rows[1]["question"]]
    assert report.n_loaded == 2


# ----------------------------------------------------------------------------- bad input

GOOD = json.dumps({"question": "q", "answer": "a"}).encode()
BAD_LINES = {
    "invalid JSON": (b'{"question": "q", "answer": }', "invalid JSON"),
    "missing field": (json.dumps({"question": "q", "answer": None}).encode(), "missing field 'answer'"),
    "wrong type": (
        json.dumps({"question": "q", "answer": 5}).encode(),
        "field 'answer' must be a string (got number)",
    ),
    "not an object": (b"[1, 2]", "record is not an object (got array)"),
    "invalid UTF-8": (b'{"question": "caf\xe9", "answer": "a"}', "invalid UTF-8"),
    "bad metadata": (
        json.dumps({"question": "q", "answer": "a", "metadata": "x"}).encode(),
        "field 'metadata' must be an object",
    ),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_jsonl_line_names_file_line_and_reason(tmp_path, case):
    line, reason = BAD_LINES[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + b"\n\n" + line + b"\n" + GOOD + b"\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}, line 3: {reason}")
    assert (info.value.location, info.value.path) == ("line 3", str(path))


BAD_CONVERSATIONS = {
    "unknown role": (
        {"messages": [user("hi"), {"role": "tool", "content": "x"}, assistant("a")]},
        "unknown role 'tool' (messages[1]",
    ),
    "empty conversation": ({"messages": []}, "empty conversation"),
    "no assistant": ({"messages": [system("s"), user("hi")]}, "conversation has no assistant turn"),
    "no content": (
        {"messages": [user("hi"), {"role": "assistant", "content": None}]},
        "message without 'content' (messages[1])",
    ),
    "content type": (
        {"messages": [user("hi"), {"role": "assistant", "content": ["x"]}]},
        "message 'content' must be a string (messages[1] is array)",
    ),
    "not a list": ({"messages": "hi"}, "field 'messages' must be an array of messages (got string)"),
    "sharegpt role": (
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
        "unknown role 'bot'",
    ),
    "mixed prompt": (
        {"prompt": "hi", "completion": [assistant("x")]},
        "fields 'prompt' and 'completion' must both be strings",
    ),
}


@pytest.mark.parametrize("case", BAD_CONVERSATIONS)
def test_bad_conversation_names_file_line_and_reason(tmp_path, case):
    row, reason = BAD_CONVERSATIONS[case]
    good = FORMAT_CASES[detect_format(row)][0]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: " + re.escape(reason)):
        load_records(path)


def test_other_file_types_name_row_or_record(tmp_path):
    rows = qa_rows(3)
    rows[1] = {"question": "q", "metadata": {"category": "x"}}
    with pytest.raises(DataError, match=r"d\.json, record 2: missing field 'answer'"):
        load_records(FILE_WRITERS["json-array"](tmp_path, rows))
    with pytest.raises(DataError, match=r"d\.parquet, row 2: missing field 'answer'"):
        load_records(FILE_WRITERS["parquet"](tmp_path, rows))
    path = tmp_path / "d.csv"
    path.write_bytes(b"question,answer\nq1,a1\nq2\nq\xff3,a3\n")
    with pytest.raises(DataError, match=r"d\.csv, row 2: missing field 'answer'"):
        load_records(path)
    records, report = load_records(path, skip_invalid=True)
    assert report.skipped == [("row 2", "missing field 'answer'"), ("row 3", report.skipped[1][1])]
    assert report.skipped[1][1].startswith("invalid UTF-8")
    assert [r.sample_id for r in records] == [0]


def test_skip_invalid_counts_and_groups_reasons(tmp_path):
    lines = [GOOD, BAD_LINES["invalid JSON"][0], BAD_LINES["missing field"][0], GOOD, BAD_LINES["invalid JSON"][0],
             b"", BAD_LINES["invalid UTF-8"][0], GOOD]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, report = load_records(path, skip_invalid=True)
    # Blank line 6 is no record: the last record is the 7th, sample_id 6.
    assert [r.sample_id for r in records] == [0, 3, 6]
    assert (report.n_read, report.n_loaded, len(report.skipped)) == (7, 3, 4)
    assert [location for location, _ in report.skipped] == ["line 2", "line 3", "line 5", "line 7"]
    groups = report.skipped_by_reason()
    assert groups == {
        "invalid JSON": ["line 2", "line 5"],
        "missing field 'answer'": ["line 3"],
        "invalid UTF-8": ["line 7"],
    }
    summary = report.summary()
    assert "loaded 3 of 7 records" in summary and "skipped 4 invalid" in summary
    assert "2 x invalid JSON (first at line 2)" in summary
    assert "1 x missing field 'answer' (first at line 3)" in summary


def test_no_usable_record_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_LINES["wrong type"][0] + b"\n")
    with pytest.raises(QTuneError, match=r"bad\.jsonl: no usable record .*1 x field 'answer' must be a string"):
        load_records(path, skip_invalid=True)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(QTuneError, match="no usable record"):
        load_records(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- rendering and tokenisation

MULTI_TURN = FORMAT_CASES["messages"][1]


def test_chat_template_labels_cover_exactly_the_assistant_turns(tiny_tokenizer):
    (sample,), report = tokenize_records([Record(7, MULTI_TURN, {})], tiny_tokenizer)
    assert report.n_out == 1 and sample["sample_id"] == 7
    spans = labelled_spans(sample)
    answers = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert [tiny_tokenizer.decode(span, skip_special_tokens=True) for span in spans] == answers
    # The end-of-turn token of each answer is trained too: the model learns to stop.
    assert [tiny_tokenizer.decode(span) for span in spans] == [a + "<|end|>" for a in answers]
    rendered = tiny_tokenizer.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tiny_tokenizer.decode(sample["input_ids"]) == rendered


def test_plain_template_labels_cover_exactly_the_assistant_turns(plain_tokenizer):
    (sample,), _ = tokenize_records([Record(0, MULTI_TURN, {})], plain_tokenizer)
    spans = labelled_spans(sample)
    assert [plain_tokenizer.decode(span) for span in spans] == ["5</s>", "8</s>"]
    assert plain_tokenizer.decode(sample["input_ids"]) == (
        "<s>Be brief.\n\nUser: 2 + 3?\nAssistant: 5</s>\nUser: And 4 + 4?\nAssistant: 8</s>"
    )
    assert sample["input_ids"][0] == plain_tokenizer.bos_token_id


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "plain_tokenizer"])
def test_render_prompt_is_the_text_before_the_answer(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    segments = render_segments(MULTI_TURN, tokenizer)
    assert [trainable for _, trainable in segments] == [False, True, False, True]
    assert render_prompt(MULTI_TURN[:2], tokenizer) == segments[0][0]
    assert render_prompt(MULTI_TURN[:4], tokenizer) == "".join(text for text, _ in segments[:3])
    with pytest.raises(QTuneError, match="already ends with an assistant turn"):
        render_prompt(MULTI_TURN, tokenizer)


def test_plain_prompt_ends_with_the_assistant_prompt(plain_tokenizer):
    assert render_prompt([user("hi")], plain_tokenizer) == "<s>User: hi\n" + PLAIN_ASSISTANT_PROMPT


def test_template_that_is_not_prefix_stable_splits_the_conversation_per_turn(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Marks only the final assistant turn: earlier turns render differently once more follows.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}FINAL:{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    # The template's own text before the answer is context, not trained.
    assert render_segments([user("hi"), assistant("yo")], tokenizer) == [("hiFINAL:", False), ("yo", True)]
    samples, report = tokenize_records([Record(3, MULTI_TURN, {})], tokenizer)
    assert [s["sample_id"] for s in samples] == [3 + TURN_ID_STRIDE, 3 + 2 * TURN_ID_STRIDE]
    assert [record_id_of(s["sample_id"]) for s in samples] == [3, 3]
    assert [tokenizer.decode(s["input_ids"]) for s in samples] == [
        "Be brief.2 + 3?FINAL:5", "Be brief.2 + 3?5And 4 + 4?FINAL:8"]
    assert [[tokenizer.decode(span) for span in labelled_spans(s)] for s in samples] == [["5"], ["8"]]
    assert (report.n_split, report.n_split_samples, report.n_out) == (1, 2, 2)
    with pytest.raises(QTuneError, match="trains as 2 samples, one per assistant turn"):
        render_segments(MULTI_TURN, tokenizer)
    # A closing mark that the next answer happens to repeat: every rendering is a prefix of the
    # whole, but the second answer's prompt ends before the first answer's span does.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if not add_generation_prompt %}.{% endif %}"
    )
    samples, report = tokenize_records([Record(0, [user("u"), assistant("x"), assistant(".y")], {})], tokenizer)
    assert [[tokenizer.decode(span) for span in labelled_spans(s)] for s in samples] == [["x"], [".y"]]
    assert report.n_split == 1


def test_template_that_changes_the_prompt_before_an_answer_is_rejected(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # The system prompt shows only in the generation prompt: no sample can hold the answer's context.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' or add_generation_prompt %}{{ m['content'] }}"
        "{% endif %}{% endfor %}"
    )
    with pytest.raises(QTuneError, match="sample 3: the chat template renders the conversation before assistant "
                                         "message 2 differently in its generation prompt"):
        tokenize_records([Record(3, MULTI_TURN, {})], tokenizer)


def test_truncation_right_and_left(plain_tokenizer):
    record = Record(0, [user("What is 12 + 30? " * 3), assistant("The answer is 42.")], {})
    (full,), _ = tokenize_records([record], plain_tokenizer, max_length=1000)
    n = len(full["input_ids"])
    answer = labelled_spans(full)[0]
    (right,), report = tokenize_records([record], plain_tokenizer, max_length=n - 2)
    assert right["input_ids"] == full["input_ids"][: n - 2] and right["labels"] == full["labels"][: n - 2]
    assert report.n_truncated == 1 and not report.excluded_ids
    (left,), report = tokenize_records([record], plain_tokenizer, max_length=len(answer) + 1, truncation_side="left")
    assert left["input_ids"] == full["input_ids"][-(len(answer) + 1) :]
    assert labelled_spans(left) == [answer]
    assert report.n_truncated == 1
    with pytest.raises(QTuneError, match="truncation_side"):
        tokenize_records([record], plain_tokenizer, truncation_side="middle")


def test_samples_without_response_tokens_are_excluded_and_reported(plain_tokenizer):
    long_prompt = Record(4, [user("Count: " + "1 2 3 " * 20), assistant("60")], {})
    empty_answer = Record(9, [user("Say nothing."), assistant("  ")], {})
    fine = Record(11, [user("2 + 2?"), assistant("4")], {})
    samples, report = tokenize_records([long_prompt, empty_answer, fine], plain_tokenizer, max_length=30)
    assert [s["sample_id"] for s in samples] == [11]
    assert (report.n_in, report.n_out, report.n_truncated) == (3, 1, 1)
    assert report.excluded_ids == [4, 9] and report.n_empty == 1
    assert "2 excluded with no response token left" in report.summary() and "sample ids 4, 9" in report.summary()


def test_tokenized_samples_are_consistent(tiny_tokenizer):
    records = [Record(i, FORMAT_CASES[name][1], {}) for i, name in enumerate(FORMATS)]
    samples, _ = tokenize_records(records, tiny_tokenizer, max_length=64)
    for sample in samples:
        assert len(sample["input_ids"]) == len(sample["attention_mask"]) == len(sample["labels"]) <= 64
        assert set(sample["attention_mask"]) == {1}
        assert all(label in (IGNORE_INDEX, token) for label, token in zip(sample["labels"], sample["input_ids"]))


# ----------------------------------------------------------------------------- batching


def test_collate_pads_both_sides_with_no_loss_on_padding():
    samples = [
        {"sample_id": 5, "input_ids": [10, 11, 12], "attention_mask": [1, 1, 1], "labels": [-100, 11, 12]},
        {"sample_id": 2, "input_ids": [20], "attention_mask": [1], "labels": [20]},
    ]
    batch = collate(samples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [20, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12], [20, -100, -100]]
    assert batch["sample_id"].dtype == torch.int64 and batch["sample_id"].tolist() == [5, 2]
    left = collate(samples, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[10, 11, 12], [0, 0, 20]]
    assert left["labels"].tolist() == [[-100, 11, 12], [-100, -100, 20]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_require_pad_token(plain_tokenizer):
    assert require_pad_token(plain_tokenizer) == plain_tokenizer.convert_tokens_to_ids("<pad>")
    tokenizer = copy.deepcopy(plain_tokenizer)
    tokenizer.pad_token = None
    with pytest.raises(QTuneError, match=r"has no pad token; pass --pad-token .*EOS token '</s>'"):
        require_pad_token(tokenizer)


def _padding(lengths, batches):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("shuffle", [False, True])
def test_bucketing_covers_every_index_once_and_groups_lengths(shuffle):
    rng = random.Random(1)
    lengths = [rng.randint(5, 500) for _ in range(1003)]
    batches = length_bucketed_batches(lengths, 8, shuffle=shuffle, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(len(b) == 8 for b in batches[:-1] if not shuffle) and sum(len(b) < 8 for b in batches) == 1
    unbucketed = list(range(1003))
    rng.shuffle(unbucketed)
    naive = [unbucketed[i : i + 8] for i in range(0, 1003, 8)]
    assert _padding(lengths, batches) < 0.1 * _padding(lengths, naive)
    dropped = length_bucketed_batches(lengths, 8, shuffle=shuffle, seed=3, drop_last=True)
    assert len(dropped) == 125 and all(len(b) == 8 for b in dropped)
    assert len({i for b in dropped for i in b}) == 1000


def test_bucketing_shuffle_is_deterministic_per_seed_and_random_across_seeds():
    lengths = [i % 37 for i in range(2000)]
    first = length_bucketed_batches(lengths, 4, shuffle=True, seed=0)
    assert first == length_bucketed_batches(lengths, 4, shuffle=True, seed=0)
    other = length_bucketed_batches(lengths, 4, shuffle=True, seed=1)
    assert first != other
    # Membership differs, not only the order of the batches.
    assert {tuple(sorted(b)) for b in first} != {tuple(sorted(b)) for b in other}
    # The batch order is shuffled, even when all samples fit in one window.
    small = length_bucketed_batches(lengths[:100], 4, shuffle=True, seed=0)
    maxima = [max(lengths[i] for i in b) for b in small]
    assert maxima != sorted(maxima)
    by_length = sorted(range(2000), key=lengths.__getitem__)
    assert length_bucketed_batches(lengths, 4) == [by_length[i : i + 4] for i in range(0, 2000, 4)]


def test_sample_id_survives_skipping_shuffling_and_batching(tmp_path, tiny_tokenizer):
    rows = qa_rows(40)
    lines = [json.dumps(row).encode() for row in rows]
    lines[5] = lines[17] = b"{broken"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    records, _ = load_records(path, skip_invalid=True)
    samples, _ = tokenize_records(records, tiny_tokenizer)
    by_id = {r.sample_id: r for r in records}
    assert 5 not in by_id and 17 not in by_id and len(by_id) == 38
    seen = []
    for batch_indices in length_bucketed_batches([len(s["input_ids"]) for s in samples], 4, shuffle=True, seed=7):
        batch = collate([samples[i] for i in batch_indices], require_pad_token(tiny_tokenizer))
        for row, sample_id in enumerate(batch["sample_id"].tolist()):
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            expected = rows[sample_id]["question"]
            assert by_id[sample_id].messages[0]["content"] == expected
            assert expected in tiny_tokenizer.decode(ids)
            seen.append(sample_id)
    assert sorted(seen) == sorted(by_id)


# ----------------------------------------------------------------------------- real data


def test_loads_the_real_gsm8k_test_split(plain_tokenizer):
    path = GSM8K / "test.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K is not at {path.resolve()} (the shared data folder beside the repository)")
    records, report = load_records(path)
    assert (report.format, report.n_read, report.n_loaded, report.skipped) == ("question_answer", 1319, 1319, [])
    assert records[0].messages[0]["content"].startswith("Janet")
    assert all(r.messages[-1]["content"].rsplit("#### ", 1)[1].strip() for r in records)
    samples, tok_report = tokenize_records(records[:50], plain_tokenizer, max_length=4096)
    assert tok_report.n_out == 50 and tok_report.n_truncated == 0
    answer = plain_tokenizer.decode(labelled_spans(samples[0])[0])
    assert answer == records[0].messages[1]["content"] + "</s>"

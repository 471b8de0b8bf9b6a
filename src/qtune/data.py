"""The data layer: dataset files -> conversations (`Record`) -> token tensors for SFT.

Pipeline: `load_records` reads a file (JSONL, JSON, Parquet, CSV or a `datasets` folder) and
normalises every row of one of `FORMATS` into a list of system/user/assistant messages;
`tokenize_records` renders each conversation into one or more samples of text segments
(`qtune.chat_templates`: the tokenizer's chat template or the plain template), tokenises them and
puts labels on the assistant turns only; `length_bucketed_batches` and `collate` turn the samples
into padded batches. Every sample keeps a `sample_id` that leads back to its source row through all
of it (`record_id_of`). `qtune.tokenized.load_tokenized` runs the same two steps for files of any
size: in parallel, into memory-mapped Arrow files, cached by content. See docs/data.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat_templates import RenderedSample, render_samples
from .errors import DataError, QTuneError

FORMATS = ("alpaca", "prompt_completion", "question_answer", "messages", "sharegpt")

# The fields that identify each format, in the order auto-detection tries them.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

IGNORE_INDEX = -100

# The sample of the k-th assistant turn (k >= 1) of a conversation split per turn gets the id
# record sample_id + k * TURN_ID_STRIDE: unique among samples, the same on every run, and the
# record's id is its remainder. Samples of unsplit conversations keep the record's id.
TURN_ID_STRIDE = 1_000_000_000

# With shuffling, batches are formed inside windows of this many batches of randomly drawn
# samples: big enough to find similar lengths, small enough that membership changes per seed.
BUCKET_WINDOW_BATCHES = 50

TOKENIZE_CHUNK = 512  # records per batched tokenizer call

# Why `tokenize_chunk` excludes a sample (0: it is kept).
EXCLUDED_NO_RESPONSE = 1  # no trainable token left (its answer truncated away)
EXCLUDED_EMPTY = 2  # every assistant turn it trains is empty or whitespace


@dataclass
class Record:
    """One conversation, normalised from a source row."""

    sample_id: int  # 0-based position of the record in its source; skipped rows keep theirs unused
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}]; loss on assistant turns
    metadata: dict = field(default_factory=dict)  # the row's optional "metadata" field; never trained on


@dataclass
class LoadReport:
    """What `load_records` read, loaded and skipped (with `skip_invalid`)."""

    path: str
    format: str
    n_read: int = 0  # records read (blank JSONL lines are not records), skipped ones included
    n_loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)

    def skipped_by_reason(self) -> dict[str, list[str]]:
        """Locations of skipped records grouped by reason (the reason without its detail in parentheses)."""
        groups: dict[str, list[str]] = {}
        for location, reason in self.skipped:
            groups.setdefault(_reason_kind(reason), []).append(location)
        return groups

    def summary(self) -> str:
        """One line: counts, format, and the skipped records grouped by reason."""
        text = f"{self.path}: loaded {self.n_loaded} of {self.n_read} records (format {self.format})"
        if self.skipped:
            groups = sorted(self.skipped_by_reason().items(), key=lambda item: -len(item[1]))
            parts = [f"{len(locations)} x {kind} (first at {locations[0]})" for kind, locations in groups]
            text += f"; skipped {len(self.skipped)} invalid: " + "; ".join(parts)
        return text


@dataclass
class TokenizeReport:
    """What `tokenize_records` kept, truncated and excluded."""

    n_in: int = 0
    n_out: int = 0
    n_truncated: int = 0  # samples longer than max_length (cut, whether kept or then excluded)
    excluded_ids: list[int] = field(default_factory=list)  # sample_ids left with no response token
    n_empty: int = 0  # of the excluded, those whose trained assistant turns were all empty
    max_length: int | None = None
    truncation_side: str = "right"
    n_split: int = 0  # conversations split into one sample per assistant turn (template not prefix-stable)
    n_split_samples: int = 0  # the samples those conversations gave, before exclusion

    def add(self, sample_id: int, split_turn: int, truncated: bool, excluded: int) -> None:
        """Count one sample of `tokenize_chunk` (its `split_turn`, `truncated` and `excluded` fields)."""
        self.n_split += split_turn == 1  # a split conversation's first sample
        self.n_split_samples += split_turn >= 1
        self.n_truncated += bool(truncated)
        if excluded:
            self.excluded_ids.append(sample_id)
            self.n_empty += excluded == EXCLUDED_EMPTY
        else:
            self.n_out += 1

    def summary(self) -> str:
        """One line: kept, truncated and excluded counts, with the first excluded sample ids, and
        the conversations split per assistant turn."""
        text = f"tokenized {self.n_in} samples: {self.n_out} kept"
        if self.n_split:
            n_samples = self.n_in - self.n_split + self.n_split_samples
            conversations = "conversation" if self.n_split == 1 else "conversations"
            text = (
                f"tokenized {self.n_in} records into {n_samples} samples ({self.n_split} {conversations} split "
                f"into {self.n_split_samples} samples, one per assistant turn, because the chat template renders "
                f"earlier turns differently once a later turn follows): {self.n_out} kept"
            )
        if self.n_truncated:
            text += f", {self.n_truncated} truncated to {self.max_length} tokens ({self.truncation_side} side)"
        if self.excluded_ids:
            first = ", ".join(str(i) for i in self.excluded_ids[:10])
            more = ", ..." if len(self.excluded_ids) > 10 else ""
            text += (
                f", {len(self.excluded_ids)} excluded with no response token left "
                f"({self.n_empty} empty answers, {len(self.excluded_ids) - self.n_empty} truncated away; "
                f"sample ids {first}{more})"
            )
        return text


class _RecordError(Exception):
    """A problem with one record; becomes a DataError, or a skipped entry with skip_invalid."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reason_kind(reason: str) -> str:
    # Reasons are written "<kind>" or "<kind> (<detail>)", so records group by kind.
    return reason.split(" (", 1)[0]


# ----------------------------------------------------------------------------- loading


def load_records(
    path, format: str = "auto", *, skip_invalid: bool = False, limit: int | None = None
) -> tuple[list[Record], LoadReport]:
    """Read a dataset file and return its records and a report.

    `format` is one of FORMATS or "auto" (detected from the fields of the first record).
    A malformed record raises DataError naming the file, its line/row/record and the reason;
    with `skip_invalid` it is skipped and listed in the report instead. `limit` stops after
    that many loaded records. Raises QTuneError when no record is usable.
    """
    records, report = open_records(path, format, skip_invalid=skip_invalid, limit=limit)
    return list(records), report


def open_records(
    path, format: str = "auto", *, skip_invalid: bool = False, limit: int | None = None
) -> tuple[Iterator[Record], LoadReport]:
    """`load_records` one record at a time: the options and the path are checked now, the records
    are read as the iterator is consumed, and the report is complete once it is exhausted."""
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise QTuneError(f"unknown data format {format!r}; choose auto or one of: {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise QTuneError(f"limit must be at least 1, got {limit}")
    report = LoadReport(path=str(path), format=format)
    rows = _read_rows(path)
    return _records(rows, path, None if format == "auto" else format, skip_invalid, limit, report), report


def source_rows(path, record_ids) -> Iterator[dict]:
    """The rows of a dataset file as they are in the file (not normalised), for the record ids
    (`Record.sample_id`: the row's position among the file's records) in `record_ids`, in file
    order: what a subset of the file is made of."""
    wanted = set(record_ids)
    with contextlib.closing(_read_rows(Path(path))) as rows:
        for record_id, (_, row) in enumerate(rows):
            if record_id in wanted:
                yield row


def _records(rows, path: Path, chosen: str | None, skip_invalid: bool, limit: int | None,
             report: LoadReport) -> Iterator[Record]:
    """open_records' iterator: normalise `rows` (of `_read_rows`) and fill `report`."""
    settled = False
    with contextlib.closing(rows):
        for sample_id, (location, row) in enumerate(rows):
            report.n_read += 1
            try:
                if isinstance(row, _RecordError):
                    raise row
                if not isinstance(row, dict):
                    raise _RecordError(f"record is not an object (got {_type_name(row)})")
                if not settled:
                    # The first readable record settles the format for the whole file.
                    report.format = _settle_format(chosen, row, path, location)
                    settled = True
                messages = _CONVERTERS[report.format](row)
                metadata = _metadata(row)
                _check_text(messages, metadata)
            except _RecordError as err:
                if not skip_invalid:
                    raise DataError(path, location, err.reason) from None
                report.skipped.append((location, err.reason))
                continue
            report.n_loaded += 1
            yield Record(sample_id, messages, metadata)
            if limit is not None and report.n_loaded >= limit:
                break
    if not report.n_loaded:
        detail = f" ({report.summary()})" if report.n_read else ""
        raise QTuneError(f"{path}: no usable record{detail}")


def detect_format(row: dict, path="<input>", location: str = "record 1") -> str:
    """The format whose identifying fields the record has (FORMAT_FIELDS, tried in order).

    Raises DataError (naming `path` and `location`) when no format matches.
    """
    found = _matching_format(row)
    if found is None:
        expected = "; ".join(f"{name} ({', '.join(keys)})" for name, keys in FORMAT_FIELDS.items())
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(path, location, f"cannot detect the format: fields {fields} match none of: {expected}")
    return found


def _matching_format(row: dict) -> str | None:
    for name, keys in FORMAT_FIELDS.items():
        if all(key in row for key in keys):
            return name
    return None


def _settle_format(chosen: str | None, row: dict, path: Path, location: str) -> str:
    """Detect the format, or check that a named one is not plainly another format."""
    if chosen is None:
        return detect_format(row, path, location)
    looks_like = _matching_format(row)
    if not all(key in row for key in FORMAT_FIELDS[chosen]) and looks_like is not None:
        raise DataError(
            path,
            location,
            f"format {chosen} needs fields {', '.join(FORMAT_FIELDS[chosen])}, but the first record has "
            f"fields {', '.join(sorted(map(str, row)))}, which look like format {looks_like} "
            f"(use --format {looks_like} or auto)",
        )
    return chosen


def _read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (location, row) for each record of the file; a row may be a _RecordError."""
    if not path.exists():
        raise QTuneError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_datasets_dir(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise QTuneError(
            f"{path}: unknown file type {path.suffix or '(no extension)'!r}; expected .jsonl, .json, "
            ".parquet, .csv or a folder saved with datasets' save_to_disk"
        )
    return reader(path)


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    # Bytes, decoded line by line, so that invalid UTF-8 is reported at its line.
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            location = f"line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield location, _RecordError(f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1})")
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                yield location, _RecordError(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    # Undecodable bytes become lone surrogates that _check_text reports at their record.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno}", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(document, dict):
        if _matching_format(document) is not None:
            raise DataError(path, "top level", "the file holds a single record; put records in an array or use JSONL")
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                path,
                "top level",
                'expected an array of records or an object with a single list field such as {"data": [...]}'
                f" (found list fields: {', '.join(lists) or 'none'})",
            )
        document = document[lists[0]]
    elif not isinstance(document, list):
        raise DataError(path, "top level", f"expected an array of records (got {_type_name(document)})")
    for number, row in enumerate(document, 1):
        yield f"record {number}", row


# In CSV every cell is text: these columns hold JSON (a conversation, or the metadata object).
_CSV_JSON_COLUMNS = ("messages", "conversations", "metadata")


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        number = 0
        try:
            for number, row in enumerate(reader, 1):
                yield f"row {number}", _csv_row(row)
        except csv.Error as exc:
            raise DataError(path, f"row {number + 1}", f"invalid CSV ({exc})") from None


def _csv_row(row: dict) -> dict | _RecordError:
    if None in row:  # DictReader files cells beyond the header under the key None
        return _RecordError("more cells than the header has columns")
    row = {key: value for key, value in row.items() if value is not None}  # a short row lacks its last fields
    for key in _CSV_JSON_COLUMNS:
        value = row.get(key)
        if value is None:
            continue
        if key == "metadata" and not value.strip():
            del row[key]
            continue
        try:
            row[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            return _RecordError(f"invalid JSON in field '{key}' ({exc.msg} at column {exc.colno})")
    return row


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise QTuneError(f"{path}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"row {number}", row


def _read_datasets_dir(path: Path) -> Iterator[tuple[str, object]]:
    # Arrow files and JSON state only: load_from_disk does not unpickle anything.
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise QTuneError(f"{path}: not a dataset folder saved with datasets' save_to_disk ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise QTuneError(f"{path}: the DatasetDict has no 'train' split (splits: {', '.join(dataset)})")
        dataset = dataset["train"]
    for number, row in enumerate(dataset, 1):
        yield f"row {number}", row


# ----------------------------------------------------------------------------- normalisation


def _type_name(value) -> str:
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _text_field(row: dict, name: str, *, optional: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if optional:
            return ""
        raise _RecordError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise _RecordError(f"field '{name}' must be a string (got {_type_name(value)})")
    return value


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _from_alpaca(row: dict) -> list[dict]:
    instruction = _text_field(row, "instruction")
    extra_input = _text_field(row, "input", optional=True)
    output = _text_field(row, "output")
    system = _text_field(row, "system", optional=True)
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages = [_turn("system", system)] if system.strip() else []
    return messages + [_turn("user", user), _turn("assistant", output)]


def _from_question_answer(row: dict) -> list[dict]:
    return [_turn("user", _text_field(row, "question")), _turn("assistant", _text_field(row, "answer"))]


def _from_prompt_completion(row: dict) -> list[dict]:
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise _RecordError(f"missing field '{name}'")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [_turn("user", prompt), _turn("assistant", completion)]
    if isinstance(prompt, list) and isinstance(completion, list):
        # TRL's conversational form: the completion continues the prompt's conversation.
        messages = _parse_messages(prompt, "prompt") + _parse_messages(completion, "completion")
        return _check_conversation(messages)
    raise _RecordError(
        "fields 'prompt' and 'completion' must both be strings or both be arrays of messages "
        f"(got {_type_name(prompt)} and {_type_name(completion)})"
    )


def _from_messages(row: dict) -> list[dict]:
    return _check_conversation(_parse_messages(row.get("messages"), "messages"))


def _from_sharegpt(row: dict) -> list[dict]:
    return _check_conversation(
        _parse_messages(row.get("conversations"), "conversations", role_key="from", content_key="value",
                        roles=SHAREGPT_ROLES)
    )


def _parse_messages(value, name: str, *, role_key="role", content_key="content", roles=None) -> list[dict]:
    """Normalise a list of message objects; `roles` maps source role names to ROLES."""
    roles = roles or {role: role for role in ROLES}
    if value is None:
        raise _RecordError(f"missing field '{name}'")
    if not isinstance(value, list):
        raise _RecordError(f"field '{name}' must be an array of messages (got {_type_name(value)})")
    messages = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise _RecordError(f"message is not an object ({where} is {_type_name(message)})")
        role, content = message.get(role_key), message.get(content_key)
        if role is None:
            raise _RecordError(f"message without '{role_key}' ({where})")
        if not isinstance(role, str) or role not in roles:
            raise _RecordError(f"unknown role {role!r} ({where}; expected one of {', '.join(roles)})")
        if content is None:
            raise _RecordError(f"message without '{content_key}' ({where})")
        if not isinstance(content, str):
            raise _RecordError(f"message '{content_key}' must be a string ({where} is {_type_name(content)})")
        messages.append(_turn(roles[role], content))
    return messages


def _check_conversation(messages: list[dict]) -> list[dict]:
    if not messages:
        raise _RecordError("empty conversation")
    if not any(message["role"] == "assistant" for message in messages):
        raise _RecordError("conversation has no assistant turn")
    return messages


_CONVERTERS = {
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "question_answer": _from_question_answer,
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
}


def _metadata(row: dict) -> dict:
    value = row.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _RecordError(f"field 'metadata' must be an object (got {_type_name(value)})")
    return value


def _check_text(messages: list[dict], metadata: dict) -> None:
    """Reject text that is not valid Unicode (undecodable bytes read as lone surrogates)."""
    pending: list = [message["content"] for message in messages] + [metadata]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _RecordError("invalid UTF-8 (undecodable bytes or a lone surrogate in the text)") from None
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


# ----------------------------------------------------------------------------- tokenisation


def tokenize_records(
    records: Sequence[Record], tokenizer, *, max_length: int = 1024, truncation_side: str = "right"
) -> tuple[list[dict], TokenizeReport]:
    """Tokenise records into samples with labels on the assistant turns only.

    Each sample is {"sample_id", "input_ids", "attention_mask", "labels"} (labels IGNORE_INDEX
    where there is no loss). A record gives one sample, or one per assistant turn when the chat
    template does not render it prefix-stably (`render_samples`; ids: TURN_ID_STRIDE). Samples
    longer than `max_length` lose their end ("right") or their beginning ("left"). A sample left
    with no trainable token, or whose trained assistant turns are all empty, is excluded and listed
    in the report. (`qtune.tokenized.load_tokenized` gives the same samples for a whole file, in
    parallel, memory-mapped and cached.)
    """
    check_tokenize_options(max_length, truncation_side)
    report = TokenizeReport(n_in=len(records), max_length=max_length, truncation_side=truncation_side)
    samples = []
    for start in range(0, len(records), TOKENIZE_CHUNK):
        for row in tokenize_chunk(records[start : start + TOKENIZE_CHUNK], tokenizer, max_length, truncation_side):
            report.add(row["sample_id"], row["split_turn"], row["truncated"], row["excluded"])
            if not row["excluded"]:
                samples.append({
                    "sample_id": row["sample_id"],
                    "input_ids": row["input_ids"],
                    "attention_mask": [1] * len(row["input_ids"]),
                    "labels": row["labels"],
                })
    return samples, report


def check_tokenize_options(max_length: int, truncation_side: str) -> None:
    """QTuneError for a max_length or truncation_side that tokenize_records does not take."""
    if max_length < 1:
        raise QTuneError(f"max_length must be at least 1, got {max_length}")
    if truncation_side not in ("right", "left"):
        raise QTuneError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")


def tokenize_chunk(records: Sequence[Record], tokenizer, max_length: int, truncation_side: str) -> list[dict]:
    """Every sample that `records` render into, in order, with one batched tokenizer call:
    {"sample_id", "input_ids", "labels", "split_turn", "truncated", "excluded"}: `split_turn` is the
    sample's assistant turn (1, 2, ...) in a conversation split into several samples, else 0;
    `excluded` is 0 (kept), EXCLUDED_NO_RESPONSE or EXCLUDED_EMPTY. `TokenizeReport.add` counts a row."""
    rendered = []  # (record, sample, whether the record gave several samples)
    for record in records:
        samples = _render_record(record, tokenizer)
        rendered += [(record, sample, len(samples) > 1) for sample in samples]
    texts = [text for _, sample, _ in rendered for text, _ in sample.segments]
    token_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    rows = []
    for record, sample, split in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, trainable in sample.segments:
            ids = list(next(token_ids))
            input_ids += ids
            labels += ids if trainable else [IGNORE_INDEX] * len(ids)
        truncated = len(input_ids) > max_length
        if truncated:
            cut = slice(0, max_length) if truncation_side == "right" else slice(len(input_ids) - max_length, None)
            input_ids, labels = input_ids[cut], labels[cut]
        answers = [m["content"] for m in record.messages if m["role"] == "assistant"]
        trained = answers if sample.turn == 0 else [answers[sample.turn - 1]]
        excluded = 0
        if all(not answer.strip() for answer in trained):
            excluded = EXCLUDED_EMPTY
        elif labels.count(IGNORE_INDEX) == len(labels):
            excluded = EXCLUDED_NO_RESPONSE
        rows.append({
            "sample_id": record.sample_id + sample.turn * TURN_ID_STRIDE,
            "input_ids": input_ids,
            "labels": labels,
            "split_turn": sample.turn if split else 0,
            "truncated": truncated,
            "excluded": excluded,
        })
    return rows


def record_id_of(sample_id: int) -> int:
    """The sample_id of the record a sample came from (the sample's own id unless its
    conversation was split per assistant turn)."""
    return sample_id % TURN_ID_STRIDE


def _render_record(record: Record, tokenizer) -> list[RenderedSample]:
    """The record's samples; an error names the record."""
    try:
        rendered = render_samples(record.messages, tokenizer)
    except QTuneError as exc:
        raise QTuneError(f"sample {record.sample_id}: {exc}") from exc
    if len(rendered) > 1 and not 0 <= record.sample_id < TURN_ID_STRIDE:
        raise QTuneError(
            f"sample {record.sample_id}: a conversation split per assistant turn needs a sample_id "
            f"in [0, {TURN_ID_STRIDE}) to number its samples"
        )
    return rendered


def require_pad_token(tokenizer) -> int:
    """The tokenizer's pad token id; QTuneError when it has none."""
    if tokenizer.pad_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        eos = f" {tokenizer.eos_token!r}" if getattr(tokenizer, "eos_token", None) else ""
        raise QTuneError(
            f"the tokenizer {name} has no pad token; pass --pad-token with one of its tokens, "
            f"e.g. its EOS token{eos} (padding never gets loss, so reusing EOS is safe)"
        )
    return tokenizer.pad_token_id


# ----------------------------------------------------------------------------- batching


def collate(samples: Sequence[dict], pad_token_id: int, *, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad samples to the longest one: input_ids, attention_mask, labels (IGNORE_INDEX on padding), sample_id."""
    if not samples:
        raise QTuneError("collate: empty batch")
    if pad_token_id is None:
        raise QTuneError("collate: no pad token id (see require_pad_token)")
    if padding_side not in ("right", "left"):
        raise QTuneError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(sample["input_ids"]) for sample in samples)
    shape = (len(samples), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, span] = torch.tensor(sample["input_ids"], dtype=torch.long)
        attention_mask[row, span] = torch.tensor(sample["attention_mask"], dtype=torch.long)
        labels[row, span] = torch.tensor(sample["labels"], dtype=torch.long)
    sample_id = torch.tensor([sample["sample_id"] for sample in samples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "sample_id": sample_id}


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
) -> list[list[int]]:
    """Batches of indices into `lengths`, grouping similar lengths to waste little padding.

    Without shuffle: indices sorted by length (ties by index), cut into batches, shortest first.
    With shuffle (deterministic per seed): indices are drawn in random order, sorted by length
    within windows of BUCKET_WINDOW_BATCHES batches, cut into batches, and the batch order is
    shuffled. Every index appears exactly once, except the one short batch that `drop_last` drops.
    """
    if batch_size < 1:
        raise QTuneError(f"batch_size must be at least 1, got {batch_size}")
    indices = list(range(len(lengths)))
    if shuffle:
        rng = random.Random(seed)
        rng.shuffle(indices)
        window = batch_size * BUCKET_WINDOW_BATCHES
        # sorted() is stable, so equal lengths stay in their random order.
        buckets = [sorted(indices[i : i + window], key=lengths.__getitem__) for i in range(0, len(indices), window)]
    else:
        buckets = [sorted(indices, key=lengths.__getitem__)]
    batches = [bucket[i : i + batch_size] for bucket in buckets for i in range(0, len(bucket), batch_size)]
    # Windows hold whole batches, so only the very last batch can be short.
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
    return batches

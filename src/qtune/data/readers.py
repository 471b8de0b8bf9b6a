"""Dataset files -> rows: one reader per file type (JSONL, JSON, Parquet, CSV, a `datasets`
folder), each yielding (location, row) with the location a user can find ("line 12", "row 3",
"record 5"). A row that cannot be read is yielded as a `RecordError` at its location, so that the
caller decides whether it stops the load or is skipped (`qtune.data.records`). A JSON file that
holds one record instead of a list of them is recognised by the formats' fields."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError, QTuneError
from .formats import RecordError, matching_format, type_name


def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (location, row) for each record of the file; a row may be a RecordError."""
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
                yield location, RecordError(f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1})")
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                yield location, RecordError(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    # Undecodable bytes become lone surrogates that _check_text reports at their record.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno}", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(document, dict):
        if matching_format(document) is not None:
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
        raise DataError(path, "top level", f"expected an array of records (got {type_name(document)})")
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


def _csv_row(row: dict) -> dict | RecordError:
    if None in row:  # DictReader files cells beyond the header under the key None
        return RecordError("more cells than the header has columns")
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
            return RecordError(f"invalid JSON in field '{key}' ({exc.msg} at column {exc.colno})")
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

"""Files -> `Record`s: `load_records` / `open_records` read a dataset file (`qtune.data.readers`)
and normalise each row of one format (`qtune.data.formats`) into a conversation, with a
`LoadReport` of what was read, loaded and skipped (`skip_invalid`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, QTuneError
from .formats import FORMATS, RecordError, normalise, settle_format, type_name
from .readers import read_rows


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


def _reason_kind(reason: str) -> str:
    # Reasons are written "<kind>" or "<kind> (<detail>)", so records group by kind.
    return reason.split(" (", 1)[0]


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
    rows = read_rows(path)
    return _records(rows, path, None if format == "auto" else format, skip_invalid, limit, report), report


def source_rows(path, record_ids) -> Iterator[dict]:
    """The rows of a dataset file as they are in the file (not normalised), for the record ids
    (`Record.sample_id`: the row's position among the file's records) in `record_ids`, in file
    order: what a subset of the file is made of."""
    wanted = set(record_ids)
    with contextlib.closing(read_rows(Path(path))) as rows:
        for record_id, (_, row) in enumerate(rows):
            if record_id in wanted:
                yield row


def _records(rows, path: Path, chosen: str | None, skip_invalid: bool, limit: int | None,
             report: LoadReport) -> Iterator[Record]:
    """open_records' iterator: normalise `rows` (of `read_rows`) and fill `report`."""
    settled = False
    with contextlib.closing(rows):
        for sample_id, (location, row) in enumerate(rows):
            report.n_read += 1
            try:
                if isinstance(row, RecordError):
                    raise row
                if not isinstance(row, dict):
                    raise RecordError(f"record is not an object (got {type_name(row)})")
                if not settled:
                    # The first readable record settles the format for the whole file.
                    report.format = settle_format(chosen, row, path, location)
                    settled = True
                messages, metadata = normalise(row, report.format)
            except RecordError as err:
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

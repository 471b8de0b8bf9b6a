"""Tokenized datasets on disk: built in parallel, memory-mapped, cached by content.

`load_tokenized(path, tokenizer, ...)` gives what `load_records` then `tokenize_records` give (the
same records, samples, order and reports), for files of any size:

- the records stream from the file into an Arrow file, never all in Python objects at once;
- `datasets.Dataset.map` tokenizes them with `num_proc` processes (`data.tokenize_chunk`, the code
  of `tokenize_records`), each writing its shard of samples as Arrow;
- `RecordTable` and `SampleTable` read them memory-mapped: `samples[i]` is the same dict of lists as
  `tokenize_records` returns, built on demand, and `samples.lengths` holds every length (numpy);
- the folder is kept in a cache, so that a second command on the same data opens it in seconds.

Layout of a cache entry, `<root>/<key>/`:

    records.arrow                       one row per loaded record, in file order:
                                        sample_id, messages (list of {role, content}), metadata (JSON text)
    samples.arrow, or samples_NNNNN_of_NNNNN.arrow
                                        one file per tokenizing process, together one row per sample
                                        in order, excluded ones included: sample_id, input_ids, labels
                                        (int32 lists), length, split_turn, truncated, excluded
                                        (the fields of `data.tokenize_chunk`)
    manifest.json                       the key's inputs, the file names and sizes, the row counts,
                                        the load and tokenize reports; written last

The root is `cache_dir`, else `$QTUNE_DATA_CACHE`, else `~/.cache/qtune/tokenized`. The key is a
hash of everything the samples depend on (`cache_spec`): the sha256 of the input's bytes (of every
file of a `datasets` folder) and its file type; the tokenizer as `save_pretrained` writes it
(vocabulary, merges, special tokens, its configuration and chat template) and the rendering path
it takes; the options format, skip_invalid, limit, max_length and truncation_side; and the qtune
code that reads and tokenizes (sha256 of the data package's files, chat_templates.py and this file) with the
transformers and tokenizers versions. The content is hashed, not the size and modification time:
copies of a file (one per bench cell, a checkout) share an entry, an edit that keeps size and time
(`cp -p`, `rsync -t`) is never missed, and hashing costs under a second per GB where tokenizing
costs minutes.

An entry is built in a temporary folder beside it and renamed into place once its manifest is
written, so a killed build never leaves a half-written entry. One process at a time opens or builds
an entry (an flock on `<root>/.<key>.lock`): processes that ask for it at once (torchrun's, bench
cells') wait for the first one's build, then open it. An entry that does not open (files
missing, of the wrong size, unreadable, rows missing) is rebuilt. Without the cache
(`cache=False`), the files go to a temporary folder that is deleted as soon as they are mapped.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .chat_templates import rendering_path
from .console import log
from .data import (
    TOKENIZE_CHUNK, LoadReport, Record, TokenizeReport, accepted_max_length, check_tokenize_options, open_records,
    tokenize_chunk,
)
from .errors import QTuneError
from .io import cache_entry_lock, replace_dir, write_json

#: Environment variable that moves the cache (default ~/.cache/qtune/tokenized).
CACHE_ENV = "QTUNE_DATA_CACHE"
#: From this many records on, the default num_proc tokenizes in parallel: below, the processes
#: save little or nothing (docs/performance.md).
PARALLEL_MIN_RECORDS = 10_000
#: The most processes the default num_proc starts.
MAX_DEFAULT_PROCS = 8

_RECORDS_FILE = "records.arrow"
_SAMPLES_FILE = "samples.arrow"  # datasets names the shards samples_NNNNN_of_NNNNN.arrow
_MANIFEST = "manifest.json"
_RECORD_BATCH = 10_000  # records per Arrow batch written while reading the file

_RECORD_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("metadata", pa.string()),
])

_CODE_SHA256 = hashlib.sha256(b"".join(
    path.read_bytes() for path in [*sorted((Path(__file__).parent / "data").glob("*.py")),
                                   Path(__file__).parent / "chat_templates.py", Path(__file__)]
)).hexdigest()


def data_cache_root() -> Path:
    """`$QTUNE_DATA_CACHE` if set, else `~/.cache/qtune/tokenized`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qtune" / "tokenized")


def default_num_proc(n_records: int) -> int:
    """1 below PARALLEL_MIN_RECORDS records, else the usable CPUs, at most MAX_DEFAULT_PROCS."""
    if n_records < PARALLEL_MIN_RECORDS:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, MAX_DEFAULT_PROCS)


@dataclass
class TokenizedData:
    """What `load_tokenized` returns."""

    records: RecordTable  # the loaded records, as `load_records` gives them
    samples: SampleTable  # the kept samples, as `tokenize_records` gives them
    load_report: LoadReport
    tokenize_report: TokenizeReport
    folder: Path | None  # the cache entry; None without the cache
    from_cache: bool  # whether an existing entry was opened (nothing was read or tokenized)


def load_tokenized(
    path, tokenizer, *, format: str = "auto", skip_invalid: bool = False, limit: int | None = None,
    max_length: int = 1024, truncation_side: str = "right", num_proc: int | None = None, cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> TokenizedData:
    """`load_records(path, format, skip_invalid, limit)` then `tokenize_records(records, tokenizer,
    max_length, truncation_side)`, with the same results and errors, into memory-mapped Arrow files.

    `num_proc` processes tokenize (default: `default_num_proc`). With `cache`, the files are kept
    under `cache_dir` (default `data_cache_root()`) and a later call with the same input bytes,
    tokenizer, options and qtune code opens them instead of reading and tokenizing (see the
    module doc). `tokenizer` is a Hugging Face tokenizer (the key hashes what `save_pretrained` writes).
    """
    records, load_report = open_records(path, format, skip_invalid=skip_invalid, limit=limit)
    check_tokenize_options(max_length, truncation_side)
    max_length = accepted_max_length(tokenizer, max_length)
    if num_proc is not None and num_proc < 1:
        raise QTuneError(f"num_proc must be at least 1, got {num_proc}")
    options = {"format": format, "skip_invalid": skip_invalid, "limit": limit, "max_length": max_length,
               "truncation_side": truncation_side}
    build = dict(tokenizer=tokenizer, max_length=max_length, truncation_side=truncation_side, num_proc=num_proc)
    with contextlib.closing(records):
        if not cache:
            folder = Path(tempfile.mkdtemp(prefix="qtune-tokenized-"))
            try:
                _build(folder, records, load_report, {"options": options}, **build)
                return dataclasses.replace(_open(folder, load_report.path), folder=None)
            finally:  # the open tables keep the mapped files readable
                shutil.rmtree(folder, ignore_errors=True)
        spec = cache_spec(path, tokenizer, options)
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(cache_dir) if cache_dir is not None else data_cache_root()
        final = root / key
        # One process builds an entry; the others (torchrun's, bench cells') wait, then open it.
        with cache_entry_lock(root, key, "the tokenized-data cache",
                              f"set {CACHE_ENV} to another folder or turn the cache off (--no-data-cache)"):
            if final.is_dir():
                try:
                    return _open(final, load_report.path, from_cache=True)
                except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
                    log(f"the tokenized-data cache entry {final} is damaged ({exc}); rebuilding it")
            work = Path(tempfile.mkdtemp(prefix=f".{key}.building-", dir=root))
            try:
                _build(work, records, load_report, spec, **build)
                replace_dir(work, final)  # a damaged or older entry is swapped out
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return _open(final, load_report.path)


def cache_spec(path, tokenizer, options: dict) -> dict:
    """Everything the cached samples depend on (the module doc); its hash is the entry's key."""
    import tokenizers
    import transformers

    return {
        "code_sha256": _CODE_SHA256,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "data_sha256": _content_sha256(Path(path)),
        "data_type": Path(path).suffix.lower() if Path(path).is_file() else "folder",
        "tokenizer_sha256": _tokenizer_sha256(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "rendering_path": rendering_path(tokenizer),
        **options,
    }


def _content_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative path, size and bytes of each, in
    sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _tokenizer_sha256(tokenizer) -> str:
    """sha256 of the files `save_pretrained` writes (the same wherever the tokenizer was loaded from)."""
    with tempfile.TemporaryDirectory(prefix="qtune-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        return _content_sha256(Path(folder))


# ----------------------------------------------------------------------------- building


def _build(folder: Path, records: Iterator[Record], load_report: LoadReport, spec: dict, *, tokenizer,
           max_length: int, truncation_side: str, num_proc: int | None) -> None:
    """Write the records, tokenize them into sample shards, and write the manifest (last)."""
    import datasets

    n_records = _write_records(folder / _RECORDS_FILE, records)
    procs = min(num_proc or default_num_proc(n_records), n_records)
    if procs > 1:
        log(f"tokenizing {n_records} records with {procs} processes")
    source = datasets.Dataset.from_file(str(folder / _RECORDS_FILE))
    with _progress_bars(n_records >= PARALLEL_MIN_RECORDS):
        samples = source.map(
            _tokenize_batch, batched=True, batch_size=TOKENIZE_CHUNK, input_columns=["sample_id", "messages"],
            remove_columns=source.column_names, features=_sample_features(), num_proc=procs if procs > 1 else None,
            fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, truncation_side=truncation_side),
            cache_file_name=str(folder / _SAMPLES_FILE), new_fingerprint="qtune-tokenized",
            load_from_cache_file=False, desc="tokenizing",
        )
    report = TokenizeReport(n_in=n_records, max_length=max_length, truncation_side=truncation_side)
    counted = ("sample_id", "split_turn", "truncated", "excluded")  # TokenizeReport.add's arguments
    for row in zip(*(samples.data.column(name).to_pylist() for name in counted)):
        report.add(*row)
    files = [_RECORDS_FILE] + [Path(f["filename"]).name for f in samples.cache_files]
    write_json(folder / _MANIFEST, {
        "spec": spec,
        "files": {name: (folder / name).stat().st_size for name in files},
        "sample_files": files[1:],
        "n_records": n_records,
        "n_sample_rows": len(samples),
        "load_report": {k: v for k, v in dataclasses.asdict(load_report).items() if k != "path"},
        "tokenize_report": dataclasses.asdict(report),
    })


def _write_records(path: Path, records: Iterator[Record]) -> int:
    """Stream records into an Arrow file (metadata as JSON text; values JSON cannot hold as their
    str()); their number."""
    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _RECORD_SCHEMA) as writer:
        batch: list[dict] = []
        for record in records:
            batch.append({"sample_id": record.sample_id, "messages": record.messages,
                          "metadata": json.dumps(record.metadata, ensure_ascii=False, default=str)})
            if len(batch) == _RECORD_BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=_RECORD_SCHEMA))
                n, batch = n + len(batch), []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=_RECORD_SCHEMA))
            n += len(batch)
    return n


def _sample_features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({
        "sample_id": datasets.Value("int64"), "input_ids": ids, "labels": ids, "length": datasets.Value("int32"),
        "split_turn": datasets.Value("int32"), "truncated": datasets.Value("bool"), "excluded": datasets.Value("int8"),
    })


def _tokenize_batch(sample_ids: list[int], messages: list[list[dict]], *, tokenizer, max_length: int,
                    truncation_side: str) -> dict[str, list]:
    """The map function: a batch of records -> the columns of their samples (every record gives one
    or more)."""
    rows = tokenize_chunk([Record(i, m) for i, m in zip(sample_ids, messages)], tokenizer, max_length,
                          truncation_side)
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    return {**columns, "length": [len(ids) for ids in columns["input_ids"]]}


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """datasets' progress bars hidden inside the block unless `shown` (a large input keeps its bar,
    unless the user turned them off)."""
    import datasets

    before = datasets.is_progress_bar_enabled()
    if not shown:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if before:
            datasets.enable_progress_bars()


# ----------------------------------------------------------------------------- reading


def _open(folder: Path, data_path: str, *, from_cache: bool = False) -> TokenizedData:
    """The tables and reports of a built folder; an error (OSError, ValueError, KeyError, an Arrow
    error) when it is incomplete or damaged."""
    manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    for name, size in manifest["files"].items():
        if (folder / name).stat().st_size != size:
            raise ValueError(f"{name} has {(folder / name).stat().st_size} bytes, not {size}")
    records = _read_arrow(folder / _RECORDS_FILE)
    samples = pa.concat_tables([_read_arrow(folder / name) for name in manifest["sample_files"]])
    if (records.num_rows, samples.num_rows) != (manifest["n_records"], manifest["n_sample_rows"]):
        raise ValueError(f"{records.num_rows} records and {samples.num_rows} samples, not "
                         f"{manifest['n_records']} and {manifest['n_sample_rows']}")
    load_report = LoadReport(path=data_path, **manifest["load_report"])
    load_report.skipped = [tuple(entry) for entry in load_report.skipped]
    return TokenizedData(RecordTable(records), SampleTable(samples), load_report,
                         TokenizeReport(**manifest["tokenize_report"]), folder, from_cache)


def _read_arrow(path: Path) -> pa.Table:
    """An Arrow stream file, memory-mapped (its data stays on disk)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


class RecordTable(Sequence):
    """The records of a tokenized dataset: `table[i]` is a `Record`, as `load_records` gives it."""

    def __init__(self, table: pa.Table):
        self._table = table

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _record(self._table.slice(_position(index, len(self)), 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Record]:
        for batch in self._table.to_batches():
            yield from map(_record, batch.to_pylist())


def _record(row: dict) -> Record:
    return Record(row["sample_id"], row["messages"], json.loads(row["metadata"]))


class SampleTable(Sequence):
    """The kept samples of a tokenized dataset: `table[i]` is {"sample_id", "input_ids",
    "attention_mask", "labels"} with lists of ints, as `tokenize_records` gives it, read from the
    memory-mapped files when asked for. `sample_ids` and `lengths` are numpy arrays of every sample's."""

    def __init__(self, table: pa.Table):
        self._rows = np.flatnonzero(table["excluded"].to_numpy() == 0)
        self.sample_ids = table["sample_id"].to_numpy()[self._rows]
        self.lengths = table["length"].to_numpy()[self._rows]
        self._input_ids = _ListColumn(table["input_ids"])
        self._labels = _ListColumn(table["labels"])

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = _position(index, len(self))
        row = self._rows[index]
        input_ids = self._input_ids[row]
        return {"sample_id": int(self.sample_ids[index]), "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids), "labels": self._labels[row]}


class _ListColumn:
    """Row i of an Arrow column of int lists as a Python list, through numpy views of each chunk's
    offsets and values (no copy of the column)."""

    def __init__(self, column: pa.ChunkedArray):
        self._starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks[:-1]]).tolist()
        self._offsets = [chunk.offsets.to_numpy() for chunk in column.chunks]
        self._values = [chunk.values.to_numpy() for chunk in column.chunks]

    def __getitem__(self, row: int) -> list[int]:
        chunk = bisect.bisect_right(self._starts, row) - 1
        offsets, j = self._offsets[chunk], row - self._starts[chunk]
        return self._values[chunk][offsets[j] : offsets[j + 1]].tolist()


def _position(index: int, length: int) -> int:
    """A sequence index (negative counts from the end) checked against `length`."""
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(f"index {index} out of range for {length} items")
    return int(position)

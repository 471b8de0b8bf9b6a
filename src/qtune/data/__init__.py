"""The data layer: dataset files -> conversations (`Record`) -> token tensors for SFT.

Pipeline: `load_records` reads a file (JSONL, JSON, Parquet, CSV or a `datasets` folder) and
normalises every row of one of `FORMATS` into a list of system/user/assistant messages;
`tokenize_records` renders each conversation into one or more samples of text segments
(`qtune.chat_templates`: the tokenizer's chat template or the plain template), tokenises them and
puts labels on the assistant turns only; `length_bucketed_batches` and `collate` turn the samples
into padded batches. Every sample keeps a `sample_id` that leads back to its source row through all
of it (`record_id_of`). `qtune.tokenized.load_tokenized` runs the same two steps for files of any
size: in parallel, into memory-mapped Arrow files, cached by content. See docs/data.md.

One module per stage: `readers` (file types -> rows), `formats` (rows -> conversations),
`records` (files -> `Record`s, with their `LoadReport`), `tokenization` (`Record`s -> samples,
with their `TokenizeReport`) and `batches` (samples -> padded batches). Their public names are
all here.
"""

from .batches import BUCKET_WINDOW_BATCHES, collate, length_bucketed_batches, require_pad_token
from .formats import FORMAT_FIELDS, FORMATS, ROLES, SHAREGPT_ROLES, detect_format
from .records import LoadReport, Record, load_records, open_records, source_rows
from .tokenization import (
    EXCLUDED_EMPTY, EXCLUDED_NO_RESPONSE, IGNORE_INDEX, TOKENIZE_CHUNK, TURN_ID_STRIDE, TokenizeReport,
    accepted_max_length, check_tokenize_options, record_id_of, tokenize_chunk, tokenize_records,
)

__all__ = [
    "BUCKET_WINDOW_BATCHES", "EXCLUDED_EMPTY", "EXCLUDED_NO_RESPONSE", "FORMATS", "FORMAT_FIELDS", "IGNORE_INDEX",
    "LoadReport", "ROLES", "Record", "SHAREGPT_ROLES", "TOKENIZE_CHUNK", "TURN_ID_STRIDE", "TokenizeReport",
    "accepted_max_length", "check_tokenize_options", "collate", "detect_format", "length_bucketed_batches",
    "load_records", "open_records", "record_id_of", "require_pad_token", "source_rows", "tokenize_chunk",
    "tokenize_records",
]

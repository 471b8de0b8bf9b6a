"""A command's dataset as tokenized samples: `load_records` then `tokenize_records` with the
command's data options (through `qtune.tokenized.load_tokenized`: in parallel, memory-mapped,
cached), with every skipped, excluded, truncated or split record reported."""

from __future__ import annotations

from .console import log
from .data import accepted_max_length
from .errors import QTuneError
from .tokenized import RecordTable, SampleTable, load_tokenized


def load_samples(cfg, tokenizer) -> tuple[RecordTable, SampleTable]:
    """Records -> tokenized samples of `cfg.data` (any config with the `DataConfig` fields): sequences
    of `Record` and of sample dicts, as `load_records` and `tokenize_records` give them. A
    `max_length` above what the tokenizer's model accepts is capped there, and said once."""
    accepted = accepted_max_length(tokenizer, cfg.max_length)
    if accepted < cfg.max_length:
        log(f"--max-length {cfg.max_length} is more than the model accepts (the tokenizer's model_max_length): "
            f"samples are cut at {accepted} tokens")
    data = load_tokenized(
        cfg.data, tokenizer, format=cfg.format, skip_invalid=cfg.skip_invalid, limit=cfg.limit,
        max_length=cfg.max_length, truncation_side=cfg.truncation_side, num_proc=cfg.num_proc, cache=cfg.data_cache,
    )
    if data.from_cache:
        log(f"{cfg.data}: {len(data.samples)} tokenized samples from the cache ({data.folder})")
    if data.load_report.skipped:
        log(data.load_report.summary())
    tok_report = data.tokenize_report
    if tok_report.excluded_ids or tok_report.n_truncated or tok_report.n_split:
        log(tok_report.summary())
    if not data.samples:
        raise QTuneError(f"{cfg.data}: no usable sample (every record was skipped or had no response token)")
    return data.records, data.samples

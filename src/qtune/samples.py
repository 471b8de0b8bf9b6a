"""A command's dataset as tokenized samples: `load_records` then `tokenize_records` with the
command's data options, with every skipped, excluded, truncated or split record reported."""

from __future__ import annotations

from .console import log
from .data import Record, load_records, tokenize_records
from .errors import QTuneError


def load_samples(cfg, tokenizer) -> tuple[list[Record], list[dict]]:
    """Records -> tokenized samples of `cfg.data` (any config with the `DataConfig` fields)."""
    records, load_report = load_records(cfg.data, cfg.format, skip_invalid=cfg.skip_invalid, limit=cfg.limit)
    if load_report.skipped:
        log(load_report.summary())
    samples, tok_report = tokenize_records(
        records, tokenizer, max_length=cfg.max_length, truncation_side=cfg.truncation_side
    )
    if tok_report.excluded_ids or tok_report.n_truncated or tok_report.n_split:
        log(tok_report.summary())
    if not samples:
        raise QTuneError(f"{cfg.data}: no usable sample (every record was skipped or had no response token)")
    return records, samples

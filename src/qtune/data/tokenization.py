"""`Record`s -> token samples: each conversation rendered into one or more samples of text
segments (`qtune.chat_templates`), tokenised with labels on the assistant turns only
(`IGNORE_INDEX` elsewhere), cut at `max_length`, each with a stable `sample_id` that leads back to
its record (`record_id_of`); a `TokenizeReport` of what was kept, truncated and excluded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..chat_templates import RenderedSample, render_samples
from ..errors import QTuneError
from .records import Record


IGNORE_INDEX = -100

# The sample of the k-th assistant turn (k >= 1) of a conversation split per turn gets the id
# record sample_id + k * TURN_ID_STRIDE: unique among samples, the same on every run, and the
# record's id is its remainder. Samples of unsplit conversations keep the record's id.
TURN_ID_STRIDE = 1_000_000_000

TOKENIZE_CHUNK = 512  # records per batched tokenizer call

# Why `tokenize_chunk` excludes a sample (0: it is kept).
EXCLUDED_NO_RESPONSE = 1  # no trainable token left (its answer truncated away)
EXCLUDED_EMPTY = 2  # every assistant turn it trains is empty or whitespace


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


def tokenize_records(
    records: Sequence[Record], tokenizer, *, max_length: int = 1024, truncation_side: str = "right"
) -> tuple[list[dict], TokenizeReport]:
    """Tokenise records into samples with labels on the assistant turns only.

    Each sample is {"sample_id", "input_ids", "attention_mask", "labels"} (labels IGNORE_INDEX
    where there is no loss). A record gives one sample, or one per assistant turn when the chat
    template does not render it prefix-stably (`render_samples`; ids: TURN_ID_STRIDE). Samples
    longer than `max_length` (at most the tokenizer's `model_max_length`: `accepted_max_length`)
    lose their end ("right") or their beginning ("left"). A sample left
    with no trainable token, or whose trained assistant turns are all empty, is excluded and listed
    in the report. (`qtune.tokenized.load_tokenized` gives the same samples for a whole file, in
    parallel, memory-mapped and cached.)
    """
    check_tokenize_options(max_length, truncation_side)
    max_length = accepted_max_length(tokenizer, max_length)
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


#: transformers' `model_max_length` of a tokenizer that states no limit (int(1e30)).
_NO_LIMIT = 10**18


def accepted_max_length(tokenizer, max_length: int) -> int:
    """`max_length` capped at the tokenizer's `model_max_length`, the longest sequence its model
    accepts (a tokenizer that states no limit leaves it as it is)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return min(max_length, limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else max_length


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
    # verbose=False: the tokenizer would warn about any text longer than its model_max_length;
    # the samples are cut below, at max_length (which callers cap with `accepted_max_length`).
    token_ids = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
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

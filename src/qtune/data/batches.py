"""Token samples -> padded batches: `length_bucketed_batches` groups similar lengths (little
padding) and `collate` pads them into tensors; `require_pad_token` names the pad id."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..errors import QTuneError
from .tokenization import IGNORE_INDEX


# With shuffling, batches are formed inside windows of this many batches of randomly drawn
# samples: big enough to find similar lengths, small enough that membership changes per seed.
BUCKET_WINDOW_BATCHES = 50


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

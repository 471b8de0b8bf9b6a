"""Error-Uncertainty scores: per-token NLL and entropy, per-sample PPL and mean entropy.

Everything is computed in float32 whatever the model's dtype, and never for the whole
[batch x length x vocab] block at once: the output projection and the log-softmax are applied a
working block of positions x vocabulary entries at a time (`qtune.head.working_block`), whose
size follows the batch's hidden states, not the vocabulary.

Token statistics are aligned with `labels`: `nll[b, t]` is `-log p(labels[b, t] | tokens < t)`,
so a mask computed from them applies to `labels` directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, collate, length_bucketed_batches
from .head import accepts_logits_to_keep, full_parameters, head_forward, resolve_head_impl, working_block
from .logit_matrix import LogitSummaries
from .processes import Processes, run_batches

#: Rows of existing logits (the logits path) converted to float32 at a time when `chunk_tokens` is
#: None: the logits themselves are the larger tensor there.
DEFAULT_CHUNK_TOKENS = 128


@dataclass
class BatchScores:
    """Scores of one batch. Token tensors are [B, L], zero outside `response_mask`."""

    nll: torch.Tensor            # float32 [B, L]
    entropy: torch.Tensor        # float32 [B, L]
    response_mask: torch.Tensor  # bool [B, L]: positions that receive loss
    ppl: torch.Tensor            # float32 [B]: exp(mean nll over response positions)
    ent: torch.Tensor            # float32 [B]: mean entropy over response (or attended) positions
    n_response: torch.Tensor     # int64 [B]
    # float32 [B, L]: a reference model's token NLL, zero outside `response_mask` (only when the
    # method needs "reference_nll" and a reference model is given: `qtune.scorer.Scorer`).
    reference_nll: torch.Tensor | None = None
    # float32 [B, L]: the attention each position receives in the last decoder layer (only when
    # the method needs "attention": `qtune.attention`).
    attention: torch.Tensor | None = None
    # float32 [B]: the nuclear norm of each sample's logits matrix over its response-predicting
    # positions (only when the method needs "nuclear_norm": `qtune.logit_matrix`).
    nuclear_norm: torch.Tensor | None = None
    # float32 [B, r1 x r2]: each sample's sketch of that matrix (only when the method needs
    # "logit_sketch": `qtune.logit_matrix.LogitSketch`).
    logit_sketch: torch.Tensor | None = None


#: The `BatchScores` fields with one value per position ([B, L]); the others hold one value (or one
#: vector) per sample.
TOKEN_FIELDS = frozenset({"nll", "entropy", "response_mask", "reference_nll", "attention"})


class _SoftmaxStatistics:
    """The NLL of each row's gold token and the entropy of each row's softmax, in float32, from
    logits that arrive a block of columns at a time (`add`), for rows [n] with gold tokens `gold`.

    With m the maximum of the columns seen, s = sum exp(x - m) and u = sum exp(x - m) (x - m):
    nll = log s - (x_gold - m) and H = -sum p log p = log s - u / s. A block that raises the
    maximum to m' rescales the sums seen so far by exp(m - m') (u also gains (m - m') s), as an
    online softmax does; with one block it is the direct computation. Each block and its
    exponential (which then holds e (x - m)) are the only large temporaries.
    """

    def __init__(self, gold: torch.Tensor):
        self.gold = gold
        like = dict(dtype=torch.float32, device=gold.device)
        # The running maximum starts finite, so that the first block's rescaling is 0 x finite.
        self.top = torch.full(gold.shape, torch.finfo(torch.float32).min, **like)
        self.total = torch.zeros(gold.shape, **like)
        self.expected = torch.zeros(gold.shape, **like)
        self.gold_logit = torch.zeros(gold.shape, **like)

    def add(self, x: torch.Tensor, first: int) -> None:
        """Take float32 logits `x` [n, c] of vocabulary entries first .. first + c - 1 (overwritten)."""
        columns = x.shape[1]
        index = self.gold - first
        picked = x.gather(1, index.clamp(0, columns - 1)[:, None]).squeeze(1)
        self.gold_logit = torch.where((index >= 0) & (index < columns), picked, self.gold_logit)
        top = torch.maximum(self.top, x.amax(dim=1))
        shift = self.top - top
        scale = shift.exp()
        # -inf logits (a masked vocabulary) would give e*z = 0*(-inf) = nan: made finite, exp 0.
        x.sub_(top[:, None]).clamp_(min=torch.finfo(torch.float32).min)
        e = torch.exp(x)
        total = e.sum(dim=1)
        self.expected = (self.expected + shift * self.total) * scale + e.mul_(x).sum(dim=1)  # e*z in place
        self.total = self.total * scale + total
        self.top = top

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll, entropy) of the rows, float32 [n]."""
        log_total = self.total.log()
        return log_total - (self.gold_logit - self.top), log_total - self.expected / self.total


def gold_nll_and_entropy(
    logits: torch.Tensor,
    gold: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of 2-D `logits` [n, V] (or the rows picked by `index`), the NLL of `gold` and the
    entropy of the softmax (`_SoftmaxStatistics`), in float32, `chunk_tokens` rows at a time
    (None: DEFAULT_CHUNK_TOKENS). `overwrite=True` lets float32 `logits` serve as the chunk itself
    (the caller gives them up), which saves a copy.
    """
    rows = DEFAULT_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    n = gold.numel() if index is None else index.numel()
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(nll)
    in_place = overwrite and index is None and logits.dtype == torch.float32
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        if index is not None:
            x = logits.index_select(0, index[part]).float()
        else:
            x = logits[part] if in_place else logits[part].to(torch.float32, copy=True)
        statistics = _SoftmaxStatistics(gold[part])
        statistics.add(x, 0)
        nll[part], entropy[part] = statistics.result()
    return nll, entropy


@torch.no_grad()
def chunked_token_statistics(hidden: torch.Tensor, head: torch.nn.Linear, gold: torch.Tensor, *,
                             chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`gold_nll_and_entropy` of `head(hidden)` for hidden states [n, d] (the body's output),
    projecting one working block (`qtune.head.working_block`) at a time: the [n x V] logits never
    exist, one float32 block of rows x columns does (its statistics accumulate over the blocks of
    columns of a row: `_SoftmaxStatistics`). A sharded head is gathered (`full_parameters`)."""
    nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(nll)
    with full_parameters(head) as (weight, bias):
        vocab = weight.shape[0]
        rows, columns = working_block(hidden.shape[0], hidden.shape[1], vocab, chunk_tokens, split_vocabulary=True)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            statistics = _SoftmaxStatistics(gold[part])
            for first in range(0, vocab, columns):
                block = slice(first, first + columns)
                logits = F.linear(hidden[part], weight[block], None if bias is None else bias[block])
                statistics.add(logits.float(), first)
                del logits
            nll[part], entropy[part] = statistics.result()
    return nll, entropy


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the positions that receive loss, those with a label except the first (it has
    no prediction). The one definition of a response token, for scoring, methods and the step."""
    mask = labels != IGNORE_INDEX
    mask[:, :1] = False  # a slice, so that an empty batch (width 0) works too
    return mask


def _masks(labels: torch.Tensor, entropy_mask: torch.Tensor | None):
    """Response positions (they get loss) and the positions whose statistics are needed."""
    response_mask = response_positions(labels)
    if entropy_mask is None:
        entropy_mask = response_mask
    else:
        entropy_mask = entropy_mask.bool().clone()
        entropy_mask[:, 0] = False
    return response_mask, entropy_mask, response_mask | entropy_mask


def _scatter(values_nll, values_entropy, wanted, response_mask, entropy_mask):
    nll = torch.zeros(wanted.shape, dtype=torch.float32, device=wanted.device)
    entropy = torch.zeros_like(nll)
    nll[wanted] = values_nll
    entropy[wanted] = values_entropy
    return nll.masked_fill_(~response_mask, 0.0), entropy.masked_fill_(~entropy_mask, 0.0)


def token_statistics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    entropy_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NLL of each gold token and entropy of each next-token distribution, in float32.

    `logits` [B, L, V] (any dtype), `labels` [B, L] with IGNORE_INDEX on positions without loss.
    Returns `(nll, entropy, response_mask)`, each [B, L] and aligned with `labels`.
    Entropy is computed where `entropy_mask` is True (default: the response positions); the
    authors' code averages it over every attended position, which `entropy_mask` allows.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    batch, length, _ = logits.shape
    response_mask, entropy_mask, wanted = _masks(labels, entropy_mask)
    rows, cols = wanted.nonzero(as_tuple=True)
    # Position t is predicted by the logits at t-1.
    nll, entropy = gold_nll_and_entropy(
        logits.reshape(batch * length, -1), labels[rows, cols].clamp_min(0),
        index=rows * length + cols - 1, chunk_tokens=chunk_tokens,
    )
    nll, entropy = _scatter(nll, entropy, wanted, response_mask, entropy_mask)
    return nll, entropy, response_mask


def sample_scores(
    nll: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample `(ppl, ent, n_response)` from token statistics.

    A sample without a response position has no score: the data layer excludes such samples,
    and meeting one here is an error rather than a silent 0 or NaN.
    """
    n_response = response_mask.sum(dim=1)
    if bool((n_response == 0).any()):
        bad = (n_response == 0).nonzero().flatten().tolist()
        raise ValueError(f"batch rows {bad} have no response token; they cannot be scored")
    ppl = torch.exp(nll.sum(dim=1) / n_response)
    if entropy_mask is None:
        ent = entropy.sum(dim=1) / n_response
    else:
        ent = entropy.sum(dim=1) / entropy_mask[:, 1:].sum(dim=1).clamp_min(1)
    return ppl, ent, n_response


@torch.no_grad()
def score_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    entropy_over: str = "response",
    chunk_tokens: int | None = None,
    head_impl: str = "auto",
    summaries: LogitSummaries | None = None,
) -> BatchScores:
    """Score a batch with a gradient-free forward pass of `model` (its current weights).

    `entropy_over="response"` (default) averages entropy over response positions, as the paper
    defines it; `"attended"` averages over every attended position, as the authors' code does.
    `head_impl` (see `qtune.head`): "auto" and "chunked" project the body's hidden states a
    working block at a time (`qtune.head.working_block`: `chunk_tokens` None sizes it to the
    batch's hidden states, memory independent of the vocabulary; a number fixes the rows); "logits"
    asks the model for the logits of the predicting positions. `summaries`: also each sample's
    logits matrix summarised (`BatchScores.nuclear_norm`, `logit_sketch`), from the same forward.
    """
    if entropy_over not in ("response", "attended"):
        raise ValueError(f"entropy_over must be 'response' or 'attended', not {entropy_over!r}")
    attended = attention_mask.bool() if entropy_over == "attended" else None
    impl = resolve_head_impl(model, head_impl, scoring=True)
    summary = (None, None)
    if impl == "logits" and not accepts_logits_to_keep(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if summaries is not None:
            rows, cols = response_positions(labels).nonzero(as_tuple=True)
            summary = summaries.of_logits(logits[rows, cols - 1], rows, labels.shape[0])
        nll, entropy, response_mask = token_statistics(logits, labels, entropy_mask=attended,
                                                       chunk_tokens=chunk_tokens)
        del logits
    else:
        # Only the predicting positions (t-1 for each needed t) are projected: prompt positions
        # cost no vocabulary projection and no memory.
        response_mask, entropy_mask, wanted = _masks(labels, attended)
        predicting = torch.zeros_like(wanted)
        predicting[:, :-1] = wanted[:, 1:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        gold = labels[wanted].clamp_min(0)
        # The projected positions that predict a response token, and the sample of each.
        responding, rows = response_mask[wanted], wanted.nonzero()[:, 0]
        split = head_forward(model, inputs, predicting) if impl == "chunked" else None
        if split is not None:
            _, hidden, head = split
            if summaries is not None:
                with full_parameters(head) as (weight, bias):  # a sharded head, gathered
                    summary = summaries.of_hidden(hidden[responding], weight, bias, rows[responding],
                                                  labels.shape[0])
            values = chunked_token_statistics(hidden, head, gold, chunk_tokens=chunk_tokens)
        else:
            logits = model(**inputs, logits_to_keep=predicting).logits
            logits = logits.reshape(-1, logits.shape[-1])
            if summaries is not None:
                summary = summaries.of_logits(logits[responding], rows[responding], labels.shape[0])
            values = gold_nll_and_entropy(logits, gold, chunk_tokens=chunk_tokens, overwrite=True)
            del logits
        nll, entropy = _scatter(*values, wanted, response_mask, entropy_mask)
    ppl, ent, n_response = sample_scores(nll, entropy, response_mask, attended)
    return BatchScores(nll, entropy, response_mask, ppl, ent, n_response, nuclear_norm=summary[0],
                       logit_sketch=summary[1])


@dataclass
class DatasetScores:
    """Scores of a whole dataset, one entry per sample, in the order of `sample_id` (ppl and ent
    None when no model scored it: `unscored_dataset`)."""

    sample_id: list[int]
    n_response: list[int]
    ppl: list[float] | None
    ent: list[float] | None
    token_nll: list[list[float]] | None
    token_entropy: list[list[float]] | None
    seconds: float
    tokens: int


def unscored_dataset(samples: Sequence[dict]) -> DatasetScores:
    """A dataset's sample ids and response token counts, in `score_dataset`'s order, with no
    model and no forward pass (ppl and ent None)."""
    counts = {int(samples[i]["sample_id"]): int(response_positions(torch.as_tensor(samples[i]["labels"])[None]).sum())
              for i in range(len(samples))}
    order = sorted(counts)
    return DatasetScores(sample_id=order, n_response=[counts[i] for i in order], ppl=None, ent=None,
                         token_nll=None, token_entropy=None, seconds=0.0, tokens=0)


def score_dataset(
    model,
    samples: Sequence[dict],
    *,
    pad_token_id: int,
    batch_size: int = 8,
    per_token: bool = False,
    chunk_tokens: int | None = None,
    head_impl: str = "auto",
    progress: bool = True,
    processes=None,
) -> DatasetScores:
    """Score tokenized samples (dicts from `qtune.data.tokenize_records`, or a `SampleTable` of
    `qtune.tokenized`) in length-bucketed batches. With `processes` (`qtune.processes.Processes`,
    every process calling), the batches are shared out over the processes and every process
    returns the whole dataset's scores, equal to one process's; `tokens` and the progress bar
    (the main process's) count every process's work."""
    from tqdm.auto import tqdm

    processes = processes or Processes()
    device = next(model.parameters()).device
    # A memory-mapped SampleTable knows its lengths without reading every sample.
    lengths = getattr(samples, "lengths", None)
    lengths = [len(s["input_ids"]) for s in samples] if lengths is None else lengths.tolist()
    batches = length_bucketed_batches(lengths, batch_size)
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(samples), unit="sample", desc="scoring", disable=not (progress and processes.is_main))

    def run(indices: list[int]) -> dict[int, tuple]:
        nonlocal tokens
        batch = collate([samples[i] for i in indices], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        scores = score_batch(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_tokens=chunk_tokens,
            head_impl=head_impl,
        )
        tokens += int(batch["attention_mask"].sum())
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(tok_s=f"{tokens * processes.world / elapsed:,.0f}", refresh=False)
        return sample_rows(batch["sample_id"], scores, per_token=per_token)

    rows = run_batches(run, batches, processes, progress_bar=bar)
    bar.close()
    return dataset_scores(rows, per_token=per_token, seconds=time.perf_counter() - start,
                          tokens=processes.total(tokens))


def sample_rows(sample_ids: torch.Tensor, scores: BatchScores, *, per_token: bool) -> dict[int, tuple]:
    """One batch's scores per sample id: (n_response, ppl, ent, (token NLLs, token entropies) of its
    response positions in order, or None without `per_token`); `dataset_scores` gathers them."""
    rows = {}
    for j, sid in enumerate(sample_ids.tolist()):
        mask = scores.response_mask[j]
        token_part = (scores.nll[j][mask].tolist(), scores.entropy[j][mask].tolist()) if per_token else None
        rows[sid] = (int(scores.n_response[j]), float(scores.ppl[j]), float(scores.ent[j]), token_part)
    return rows


def dataset_scores(rows: dict[int, tuple], *, per_token: bool, seconds: float, tokens: int) -> DatasetScores:
    """The `DatasetScores` of every sample's `sample_rows`, in ascending sample id."""
    order = sorted(rows)
    return DatasetScores(
        sample_id=order,
        n_response=[rows[i][0] for i in order],
        ppl=[rows[i][1] for i in order],
        ent=[rows[i][2] for i in order],
        token_nll=[rows[i][3][0] for i in order] if per_token else None,
        token_entropy=[rows[i][3][1] for i in order] if per_token else None,
        seconds=seconds,
        tokens=tokens,
    )

"""The `rds` selector (RDS+): keep_count(ratio, N) samples whose pooled hidden states are the closest
(cosine) to those of the target set (`--target-data`), the tasks of the target set taking turns.

Citation: RDS+, Ivison, Zhang, Brahman, Koh and Dasigi, "Large-Scale Data Selection for
Instruction Tuning", arXiv 2503.01807 (2025). Reimplemented from the paper's description; no code
was read or copied. What the paper says that could be read here (its abstract and its Figure 6
caption): "a pretrained LM encodes a data pool and a set of query points via weighted
mean-pooling", "cosine similarity between each point in the pool and the query set", "pick the
top-K most similar points using Algorithm 1"; RDS+ "uses weighted mean pooling of pretrained LM
hidden states". The body of the method section and Algorithm 1 could not be read; the rest below
is this implementation's reading, marked (assumed):

1. Representation (`pooled_hidden_states`): one forward pass of every pool and query sample through
   the scoring model (`--model`, meant to be the pretrained base model), without gradients; its
   last hidden states (assumed: the last layer's, its decoder's `last_hidden_state`, equal to
   `hidden_states[-1]` of the whole model; for Llama-style models that is after the final norm,
   the states the LM head reads); weighted mean pooling over every attended token of the sample,
   prompt and response alike (assumed), padding excluded (`weighted_mean_pool`): the weight of the
   i-th attended token (i = 1 .. n) is i / (1 + ... + n), the position-weighted mean of SGPT
   (Muennighoff, arXiv 2202.08904), which later tokens, having seen more of the sample under
   causal attention, weigh more (assumed: the paper's "weighted mean pooling" taken as SGPT's).
2. Score (`task_scores`): the cosine similarity of each pool sample with each query sample; a pool
   sample's score for a task is its highest cosine over that task's query samples (assumed: max;
   the released RDS+ models are named "rrmax", e.g. hamishivi/tulu-2-multitask-rrmax-326k-sft).
   Tasks: the values of `--less-target-field` in the target records' metadata (the option the
   `less` selector uses for its subtasks; one task when unset; a record without the field is an
   error naming it).
3. Choice (`round_robin`): the tasks take turns, in the sorted order of their names, each taking
   its highest-scoring sample not yet chosen, until keep_count(ratio, N) are chosen (assumed:
   Algorithm 1 as a round-robin over tasks). With one task this is the top of its scores.

The score written to scores.parquet is each pool sample's best task score (its highest cosine to
any query sample), in [-1, 1]. With one task it is what the choice ranks by; with several, the
round-robin decides, and a sample of high best score can lose to a task's turn.

Parameters: `--target-data` (required), `--less-target-field`, `--batch-size` (samples per forward
batch, bucketed by length), `--ratio`.

Memory, besides the model: one forward batch's activations through the model's decoder (no
logits: the LM head is not run; a model without `get_decoder` runs whole with
`output_hidden_states`, which holds every layer's states of the batch); the
pooled vectors of the whole pool and query set, (N + Q) x hidden float32 (every process holds
them all after the gather); the N x tasks scores. The similarity matrix is never N x Q: the pool
is compared with the query matrix SIMILARITY_FLOATS / Q rows at a time (64 MiB of float32), each
block reduced to its per-task maxima at once. Time: one forward pass per pool and query sample
(no backward), and 2 x N x Q x hidden flops for the cosines (on the model's device), and the
round-robin's sorting of each task's N scores.

Deviations from the paper, as far as it could be read: the pool and query passes use the scoring
model you give (the paper encodes with a pretrained LM: give a base model, not a tuned one);
the tasks' order in the round-robin is their names' sorted order; samples longer than the model's
context are not truncated here (the data options' `--max-length` does it); ties: within a task,
equal scores go to the earlier sample (in the order of `scores.sample_id`), as `keep_top`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..data import collate, length_bucketed_batches
from ..head import accepts_logits_to_keep
from ..pruning import keep_count
from ..processes import Processes, run_batches
from .base import StaticChoice, register_selector
from .less import target_tasks

#: Floats of one block of the pool x query similarity matrix (64 MiB of float32): the pool is
#: compared with the queries max(1, SIMILARITY_FLOATS // Q) rows at a time.
SIMILARITY_FLOATS = 1 << 24


def weighted_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Float32 [B, H]: the position-weighted mean of `hidden` [B, T, H] over the attended positions
    of `attention_mask` [B, T] (1 attended, 0 padding): the i-th attended position of a row
    (i = 1 .. n, counted among its attended positions only, so left and right padding give the
    same result) has weight i / (n (n + 1) / 2), a padded one 0. A row without an attended
    position pools to zeros."""
    mask = attention_mask.to(torch.float32)
    order = mask.cumsum(dim=1) * mask  # 1 .. n on the attended positions, 0 elsewhere
    weights = order / order.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.einsum("bt,bth->bh", weights, hidden.to(torch.float32))


def _last_hidden_state(model, batch: dict) -> torch.Tensor:
    """The model's last hidden states ([B, T, H]) for a batch on its device: its decoder's output
    (`get_decoder()`, for Llama-style models after the final norm: what the LM head reads), so
    that neither the other layers' states nor the logits are kept; a model without a decoder to
    call runs whole with `output_hidden_states`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    use_cache=False, **extra)
    return outputs.hidden_states[-1]


@torch.no_grad()
def pooled_hidden_states(model, samples, *, pad_token_id: int, batch_size: int, processes: Processes | None = None,
                         progress: bool = True, desc: str = "rds: pooling") -> torch.Tensor:
    """Float32 [N, H]: `weighted_mean_pool` of the model's last hidden states for each of `samples`
    (tokenized dicts, or a `SampleTable`), in their order. Length-bucketed batches of `batch_size`,
    right-padded with `pad_token_id`, shared out over `processes` (`run_batches`; every process
    returns the whole result, equal to one process's); a progress bar on the main process."""
    from tqdm.auto import tqdm

    processes = processes or Processes()
    device = next(model.parameters()).device
    lengths = getattr(samples, "lengths", None)
    lengths = [len(s["input_ids"]) for s in samples] if lengths is None else lengths.tolist()
    bar = tqdm(total=len(samples), unit="sample", desc=desc, disable=not (progress and processes.is_main))

    def run(indices: list[int]) -> dict[int, torch.Tensor]:
        batch = collate([samples[i] for i in indices], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        pooled = weighted_mean_pool(_last_hidden_state(model, batch), batch["attention_mask"]).cpu()
        return {i: pooled[row].clone() for row, i in enumerate(indices)}  # own storage: each pickles alone

    rows = run_batches(run, length_bucketed_batches(lengths, batch_size), processes, progress_bar=bar)
    bar.close()
    if not rows:
        return torch.zeros(0, 0)
    return torch.stack([rows[i] for i in range(len(samples))])


def task_scores(pool: torch.Tensor, queries: torch.Tensor, task: torch.Tensor, n_tasks: int, *,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 [N, n_tasks] (on the CPU): for each pool vector (`pool` [N, H]) and task, its highest
    cosine similarity to the query vectors (`queries` [Q, H]) of that task (`task` [Q], the task
    index of each query, every task having at least one). The pool goes SIMILARITY_FLOATS / Q rows
    at a time, on `device` (default: the pool's)."""
    device = pool.device if device is None else torch.device(device)
    queries = F.normalize(queries.to(device, torch.float32), dim=1)
    task = task.to(device)
    rows = max(1, SIMILARITY_FLOATS // max(1, queries.shape[0]))
    out = torch.empty(pool.shape[0], n_tasks, dtype=torch.float32)
    for start in range(0, pool.shape[0], rows):
        block = F.normalize(pool[start:start + rows].to(device, torch.float32), dim=1)
        cosine = block @ queries.T  # [b, Q]
        best = torch.full((block.shape[0], n_tasks), -torch.inf, dtype=torch.float32, device=device)
        out[start:start + rows] = best.scatter_reduce(1, task.expand_as(cosine), cosine, "amax").cpu()
    return out


def round_robin(scores: torch.Tensor, count: int) -> list[int]:
    """Positions of `count` rows of `scores` [N, T] (capped at N), in the order chosen: the tasks
    (columns) take turns, 0, 1, .., T - 1, 0, ..; at its turn a task takes its highest-scoring row
    not yet taken (a task whose best rows another took goes down its own list to the first free
    one, and does not lose its turn). Ties within a task: the earlier row first. With one column,
    the `count` highest rows, in descending order."""
    n, tasks = scores.shape
    count = min(count, n)
    # Descending by score, ties by position: a stable sort of the negated scores.
    orders = [torch.sort(-scores[:, t].double(), stable=True).indices.tolist() for t in range(tasks)]
    cursor = [0] * tasks
    taken = [False] * n
    chosen: list[int] = []
    while len(chosen) < count:
        for t in range(tasks):
            if len(chosen) == count:
                break
            order = orders[t]
            while taken[order[cursor[t]]]:
                cursor[t] += 1
            taken[order[cursor[t]]] = True
            chosen.append(order[cursor[t]])
    return chosen


@register_selector("rds")
class RdsSelector:
    """keep_count(ratio, N) samples closest to --target-data (RDS+: cosine of weighted-mean-pooled last hidden states, max over each task's targets, tasks in turn)"""

    needs = frozenset({"model", "target"})
    shares_passes = True  # its forward passes go through run_batches: every process calls choose

    def choose(self, cfg, inputs) -> StaticChoice:
        samples, processes = inputs.samples, inputs.processes
        task, names = target_tasks(inputs.target_metadata, cfg.less_target_field)
        started = time.perf_counter()
        options = dict(pad_token_id=inputs.pad_token_id, batch_size=cfg.batch_size, processes=processes,
                       progress=getattr(cfg, "progress", True))
        queries = pooled_hidden_states(inputs.model, inputs.target_samples, desc="rds: target set", **options)
        pool = pooled_hidden_states(inputs.model, samples, desc="rds: pool", **options)
        forward_seconds = time.perf_counter() - started
        started = time.perf_counter()
        by_task = task_scores(pool, queries, task, len(names), device=next(inputs.model.parameters()).device)
        # Rows in the order of scores.sample_id, so that "earlier" means what it does for keep_top.
        position = {samples[i]["sample_id"]: i for i in range(len(samples))}
        ids = list(inputs.scores.sample_id)
        by_task = by_task[torch.tensor([position[s] for s in ids], dtype=torch.long)]
        chosen = set(round_robin(by_task, keep_count(cfg.ratio, len(ids))))
        stats = {"tasks": names, "target_samples": len(inputs.target_samples),
                 "target_samples_per_task": torch.bincount(task, minlength=len(names)).tolist(),
                 "hidden_size": int(pool.shape[1]), "forward_seconds": forward_seconds,
                 "similarity_seconds": time.perf_counter() - started}
        return StaticChoice([s for i, s in enumerate(ids) if i in chosen], by_task.max(dim=1).values.tolist(),
                            "closest to the target set (RDS+: pooled hidden states' cosine, tasks in turn)", stats)

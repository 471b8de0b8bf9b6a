"""One training step with dynamic pruning, framework-free: plain functions on a model and the
step's micro-batches, usable from the transformers Trainer (`qtune.train`), TRL or a plain loop.

    scores   = scorer(model, ...)     no-grad pass (`qtune.scorer.Scorer`), if the method asks
    plan     = plan_step(...)         gather (triage_scope) -> decide -> own rows -> pack -> count
    for mb in plan.micro_batches:     as few as hold the kept rows, as many on every process
        backward(micro_batch_loss(model, mb, plan.loss_tokens, plan.world_size))

Rules:
- Under several processes (torch.distributed initialised by torchrun or accelerate; world size 1
  is the plain path), `triage_scope="global"` gathers every process's micro-batches and scores in
  rank order and every process runs the method on that global batch: the decisions agree because
  methods are deterministic. `"local"`: each process decides over its own share.
- Each process trains only its own kept rows, cut out of its micro-batches (`pack_kept`).
- The loss is sum(weight x token cross-entropy) over the process's kept tokens divided by the
  kept-token count of the whole step over every process, times the world size: the gradient
  all-reduce averages over processes, so the update is that of the mean over every kept token.
- The kept rows of a step go into as few micro-batches as hold them with no more rows each than
  the largest given one (a device bound by launches rather than arithmetic runs one full pass far
  faster than four quarter-full ones), the same number on every process.
- No process skips a backward: a micro-batch left without rows gets one two-token row of weight
  0, so that every process joins every gradient reduction (DDP, FSDP, ZeRO) with zeros.
- The step's statistics (`StepPlan.record`) are those of every process, identical everywhere;
  writing them is the caller's job, on the main process only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .methods import Decision, Method, Selection, response_mask_of
from .objectives import Objective
from .head import accepts_logits_to_keep, head_forward, linear_cross_entropy, resolve_head_impl
from .models import base_model
from .phases import PhaseClock
from .scorer import Scorer
from .scoring import BatchScores

TRIAGE_SCOPES = ("global", "local")


def launched_processes() -> int:
    """The processes a launcher started (torchrun and accelerate launch set WORLD_SIZE), readable
    before torch.distributed is initialised; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj) -> list:
    """`obj` of every process, in rank order (a list of one without torch.distributed)."""
    _, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _to(value, device):
    """Tensors of a batch dict or BatchScores moved to `device` (for gathering: on the CPU)."""
    if isinstance(value, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in value.items()}
    return BatchScores(**{k: None if getattr(value, k) is None else getattr(value, k).to(device)
                          for k in BatchScores.__dataclass_fields__})


@dataclass
class StepPlan:
    """What a process trains in one step.

    micro_batches: this process's packed micro-batches, as many on every process, at least one and
        at most as many as it was given (`pack_kept`), none empty (a process short of rows trains
        a row of weight 0 in their place).
    loss_tokens: kept loss tokens of the step over every process (the loss normaliser).
    world_size: processes that train the step.
    decision: the method's decision, over the global batch (global scope) or this process's share.
    record: statistics of the step over every process (see `plan_step`).
    nonfinite: what was wrong with the scores when a score was NaN or inf (nothing is kept then).
    """

    micro_batches: list[dict]
    loss_tokens: int
    world_size: int
    decision: Decision
    record: dict
    nonfinite: str | None = None


def _nonfinite(bad: int, total: int) -> str | None:
    # A healthy model cannot produce NaN or inf scores: it is the model that has diverged.
    return f"the scoring pass gave a non-finite PPL or entropy for {bad} of {total} samples" if bad else None


def _keep_nothing(batches: list[dict], method: Method) -> Decision:
    """A step that trains no sample (its scores were not finite)."""
    selections = [Selection(torch.zeros(0, dtype=torch.long), torch.zeros_like(b["labels"], dtype=torch.bool))
                  for b in batches]
    stats = {"samples": sum(b["labels"].shape[0] for b in batches), "kept": 0}
    return Decision.over(batches, selections, method.nominal_budget, stats)


def _take_row(batch: dict, row: int, selection: Selection) -> dict | None:
    """One row of a right-padded batch with pruned labels, cut after its last loss position
    (later positions cannot influence the loss of a causal model). None if no token is left."""
    labels = batch["labels"][row].masked_fill(~selection.label_mask[row], IGNORE_INDEX)
    positions = (labels != IGNORE_INDEX).nonzero()
    if positions.numel() == 0:
        return None
    end = int(positions[-1]) + 1
    out = {
        "input_ids": batch["input_ids"][row, :end],
        "attention_mask": batch["attention_mask"][row, :end],
        "labels": labels[:end],
        "sample_id": batch["sample_id"][row],
    }
    weights = selection.weights
    if weights is not None:
        weights = weights[row, :end] if weights.dim() == 2 else weights[row].expand(end)
        out["loss_weight"] = weights.float()
    return out


def _concatenate(group: list[dict], weighted: bool, device) -> dict:
    """Rows as one row without padding: `position_ids` restart at 0 for each row (transformers
    then attends within each row only: flash-attention varlen, or a block-diagonal mask), and
    each row's first label is ignored (the previous row's last position must not predict it)."""
    if not group:
        empty = torch.zeros((1, 0), dtype=torch.long, device=device)
        micro = {"input_ids": empty, "attention_mask": empty, "labels": empty, "position_ids": empty,
                 "sample_id": torch.zeros(0, dtype=torch.long, device=device)}
        if weighted:
            micro["loss_weight"] = torch.zeros((1, 0), dtype=torch.float32, device=device)
        return micro
    labels = [r["labels"].clone() for r in group]
    for row in labels:
        row[0] = IGNORE_INDEX
    micro = {
        "input_ids": torch.cat([r["input_ids"] for r in group])[None],
        "attention_mask": torch.cat([r["attention_mask"] for r in group])[None],  # all ones: counts tokens
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat([torch.arange(len(r["input_ids"]), device=device) for r in group])[None],
        "sample_id": torch.stack([r["sample_id"] for r in group]),
    }
    if weighted:
        micro["loss_weight"] = torch.cat([r["loss_weight"] if "loss_weight" in r else
                                          torch.ones(len(r["input_ids"]), device=device) for r in group])[None]
    return micro


def _stack(rows: list[dict], n_parts: int, pad_token_id: int, device, *, concatenate: bool = False) -> list[dict]:
    """`rows` spread evenly over `n_parts` micro-batches: right-padded to the longest row of each,
    or with `concatenate` one padding-free row each (`_concatenate`)."""
    bounds = [round(i * len(rows) / n_parts) for i in range(n_parts + 1)]
    weighted = any("loss_weight" in r for r in rows)
    packed = []
    for start, end in zip(bounds, bounds[1:]):
        group = rows[start:end]
        if concatenate:
            packed.append(_concatenate(group, weighted, device))
            continue
        length = max((len(r["input_ids"]) for r in group), default=0)

        def stack(key, fill, dtype=torch.long):
            out = torch.full((len(group), length), fill, dtype=dtype, device=device)
            for i, r in enumerate(group):
                out[i, : len(r["input_ids"])] = r[key] if key in r else 1.0  # a row without weights weighs 1
            return out

        micro = {
            "input_ids": stack("input_ids", pad_token_id),
            "attention_mask": stack("attention_mask", 0),
            "labels": stack("labels", IGNORE_INDEX),
            "sample_id": torch.stack([r["sample_id"] for r in group]) if group else
            torch.zeros(0, dtype=torch.long, device=device),
        }
        if weighted:
            micro["loss_weight"] = stack("loss_weight", 0.0, torch.float32)
        packed.append(micro)
    return packed


def pack_kept(batches: list[dict], selections: list[Selection], pad_token_id: int, *,
              concatenate: bool = False) -> list[dict]:
    """Cut the kept rows out of the step's micro-batches and spread them evenly over as few
    micro-batches as hold them with no more rows than the largest given micro-batch (each row is
    at most as long as it was, so no micro-batch needs more memory than before): a pass over a
    quarter of the rows costs far more than a quarter of a pass where a device is bound by
    launches and dispatch rather than arithmetic, so fewer, fuller passes are faster. None when
    no row is kept. `concatenate`: each micro-batch is one padding-free row with `position_ids`
    (for varlen attention), else right-padded rows."""
    rows = _kept_rows(batches, selections)
    if not rows:
        return []
    return _stack(rows, _parts_needed(batches, len(rows)), pad_token_id, batches[0]["input_ids"].device,
                  concatenate=concatenate)


def _kept_rows(batches: list[dict], selections: list[Selection]) -> list[dict]:
    return [row for batch, selection in zip(batches, selections) for r in selection.rows.tolist()
            if (row := _take_row(batch, r, selection)) is not None]


def _parts_needed(batches: list[dict], n_rows: int) -> int:
    """Micro-batches for `n_rows` kept rows: no more rows each than the largest given one."""
    capacity = max(b["input_ids"].shape[0] for b in batches)
    return min(len(batches), -(-n_rows // capacity))


def placeholder_row(batch: dict) -> dict:
    """A two-token row of weight 0, for a process that keeps no row in a step (every process runs
    at least the last, synchronising, backward) or a training loop that needs a fixed number of
    micro-batches: its forward and backward touch every parameter a real row touches and
    contribute exactly zero."""
    labels = batch["input_ids"][:1, :2].clone()
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": batch["input_ids"][:1, :2], "attention_mask": torch.ones_like(labels),
            "labels": labels, "sample_id": batch["sample_id"][:1],
            "loss_weight": torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)}


def loss_token_count(batches: list[dict]) -> int:
    """Labels that receive loss, over `batches`."""
    return sum(int(response_mask_of(b).sum()) for b in batches)


def kept_token_masks(batches: list[dict], selections: list[Selection]) -> dict[str, str]:
    """For each kept row with a token left: which of its response tokens keep their loss, in order,
    as a string of "0" and "1" keyed by the sample id (a string, as JSON keys are)."""
    masks = {}
    for batch, selection in zip(batches, selections):
        response = response_mask_of(batch)
        for row in selection.rows.tolist():
            kept = selection.label_mask[row][response[row]].tolist()
            if any(kept):
                masks[str(int(batch["sample_id"][row]))] = "".join("1" if k else "0" for k in kept)
    return masks


def plan_step(batches: list[dict], scores: list[BatchScores] | None, method: Method, step: int, *,
              pad_token_id: int, triage_scope: str = "global", clock: PhaseClock | None = None,
              concatenate: bool = False, log_token_masks: bool = False) -> StepPlan:
    """Decide what this process trains in this step, from its micro-batches and their scores.

    Every process must call it at the same step (it gathers). `clock` receives the seconds of
    the phases "select" (the method's decision; "triage" and "token_select" for methods with
    both stages) and "pack". `concatenate`: the kept rows of each micro-batch as one padding-free
    row (`pack_kept`). The record holds, over every process: samples, kept (rows),
    response_tokens, kept_tokens, input_tokens, trained_input_tokens, trained_positions (the
    positions the training forward runs over, padding included), sample_ids and kept_ids (in
    rank order), and the method's statistics (global scope: the method's own; local scope:
    integer counts summed, other values those of process 0). `log_token_masks`: the record also
    holds kept_token_masks (`kept_token_masks`, every process's rows).
    """
    if triage_scope not in TRIAGE_SCOPES:
        raise ValueError(f"triage_scope must be one of {TRIAGE_SCOPES}, not {triage_scope!r}")
    rank, size = world()
    device = batches[0]["input_ids"].device
    finite = None if scores is None else torch.cat([s.ppl.isfinite() & s.ent.isfinite() for s in scores])
    bad = 0 if finite is None else int((~finite).sum())

    # Gather: under global scope the method sees every process's micro-batches and scores, in
    # rank order (through the CPU: all_gather_object pickles). Every process learns whether any
    # score was not finite, so that all of them skip or stop together.
    n_samples = sum(b["labels"].shape[0] for b in batches)
    global_view = triage_scope == "global" and size > 1
    mine = (([_to(b, "cpu") for b in batches], None if scores is None else [_to(s, "cpu") for s in scores])
            if global_view else None)
    shares = gather((mine, bad, n_samples, len(batches)))
    nonfinite = _nonfinite(sum(s[1] for s in shares), sum(s[2] for s in shares))
    if global_view:
        seen = [b for s in shares for b in s[0][0]]
        seen_scores = None if scores is None else [x for s in shares for x in s[0][1]]
        own = slice(sum(s[3] for s in shares[:rank]), sum(s[3] for s in shares[: rank + 1]))
    else:
        seen, seen_scores, own = batches, scores, slice(0, len(batches))

    # Decide, then take this process's own rows.
    clock = clock or PhaseClock()
    with clock.phase("select"):
        decision = _keep_nothing(seen, method) if nonfinite else method.select(seen, seen_scores, step)
    clock.add(decision.stage_seconds)
    with clock.phase("pack"):
        selections = [Selection(s.rows.to(device), s.label_mask.to(device),
                                None if s.weights is None else s.weights.to(device))
                      for s in decision.selections[own]]
        rows = _kept_rows(batches, selections)
        # Every process trains the same number of micro-batches (each forward of FSDP or ZeRO-3
        # gathers parameters): as many as the process with the most kept rows needs.
        n_parts = max(1, max(_parts_needed(batches, n) for n in gather(len(rows))))
        packed = _stack(rows, n_parts, pad_token_id, device, concatenate=concatenate)

    # Statistics and the loss normaliser, over every process.
    local = {
        "samples": n_samples,
        "kept": sum(p["sample_id"].numel() for p in packed),
        "response_tokens": loss_token_count(batches),
        "kept_tokens": loss_token_count(packed),
        "input_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "trained_input_tokens": sum(int(p["attention_mask"].sum()) for p in packed),
        "trained_positions": sum(p["input_ids"].numel() for p in packed),
        "sample_ids": torch.cat([b["sample_id"] for b in batches]).tolist(),
        "kept_ids": torch.cat([p["sample_id"] for p in packed]).tolist(),
        "stats": decision.stats,
    }
    if log_token_masks:
        local["kept_token_masks"] = kept_token_masks(batches, selections)
    everyone = gather(local)
    record = {key: sum((r[key] for r in everyone), [] if key.endswith("_ids") else 0)
              for key in local if key not in ("stats", "kept_token_masks")}
    if log_token_masks:
        record["kept_token_masks"] = {k: v for r in everyone for k, v in r["kept_token_masks"].items()}
    stats = dict(everyone[0]["stats"])
    if triage_scope == "local":
        for key, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool):
                stats[key] = sum(r["stats"][key] for r in everyone)
    record = {**stats, **record}

    packed = [p if p["sample_id"].numel() else placeholder_row(batches[0]) for p in packed]
    return StepPlan(packed, max(record["kept_tokens"], 1), size, decision, record, nonfinite)


def micro_batch_loss(model, micro_batch: dict, loss_tokens, world_size: int = 1, *, unwrapped=None,
                     return_outputs: bool = False, head_impl: str = "auto", chunk_tokens: int = 128,
                     objective: Objective | None = None):
    """This process's share of the step's loss on one packed micro-batch: sum of (weighted) token
    cross-entropies / the step's kept tokens over every process, times the world size (see the
    module's rules). `unwrapped`: the model inside a DDP/FSDP wrapper, to see which arguments it
    takes. `objective`: a token objective in place of cross-entropy (`qtune.objectives`; None or
    "nll": cross-entropy).

    Only positions that predict a kept label reach the output projection (prompt, padding and
    pruned tokens cost none). `head_impl` (see `qtune.head`): "chunked" computes the loss and
    its gradient `chunk_tokens` positions at a time from the body's hidden states, "liger" with
    Liger Kernel's fused kernel, "logits" from float32 logits of every kept position; "auto" is
    chunked (a model whose head cannot be split off takes the logits path).
    """
    labels = micro_batch["labels"]
    targets_mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][targets_mask]
    weights = micro_batch["loss_weight"][:, 1:][targets_mask] if "loss_weight" in micro_batch else None
    # Concatenated rows carry position_ids and no mask: transformers then attends within each row
    # (it looks for such rows only without a KV cache).
    inputs = {"input_ids": micro_batch["input_ids"]}
    if "position_ids" in micro_batch:
        inputs.update(position_ids=micro_batch["position_ids"], use_cache=False)
    else:
        inputs["attention_mask"] = micro_batch["attention_mask"]
    target = unwrapped if unwrapped is not None else model
    if objective is not None and objective.is_nll:
        objective = None
    impl = resolve_head_impl(target, head_impl, weighted=weights is not None or objective is not None)
    split = None
    if accepts_logits_to_keep(target):
        predicting = torch.zeros_like(labels, dtype=torch.bool)
        predicting[:, :-1] = targets_mask
        split = head_forward(model, inputs, predicting) if impl != "logits" else None
        if split is not None:
            outputs, hidden, head = split
            loss = linear_cross_entropy(hidden, head, targets, weights, chunk_tokens=chunk_tokens, impl=impl,
                                        objective=objective)
        else:
            outputs = model(**inputs, logits_to_keep=predicting)
            logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    else:
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1][targets_mask]
    if split is None and objective is None and weights is None:
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    elif split is None:
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
        if objective is not None:
            token_loss = objective(-token_loss)
        loss = token_loss.sum() if weights is None else (token_loss * weights).sum()
    loss = loss / loss_tokens * world_size
    return (loss, outputs) if return_outputs else loss


def concatenates_kept_rows(model, kept_row_layout: str) -> bool:
    """Whether the kept rows go to `model` as one padding-free row per micro-batch:
    "concatenated", or "auto" with a flash-attention implementation (varlen kernels cost the
    real tokens; sdpa and eager would build a dense block-diagonal mask over the whole row)."""
    if kept_row_layout not in ("auto", "padded", "concatenated"):
        raise ValueError(f"kept_row_layout must be 'auto', 'padded' or 'concatenated', not {kept_row_layout!r}")
    if kept_row_layout != "auto":
        return kept_row_layout == "concatenated"
    config = getattr(base_model(model), "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over every process (itself without torch.distributed)."""
    if world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def train_step(model, batches: list[dict], method: Method, step: int, total_steps: int, *, pad_token_id: int,
               triage_scope: str = "global", chunk_tokens: int = 128, head_impl: str = "auto",
               clock: PhaseClock | None = None, kept_row_layout: str = "auto",
               scorer: Scorer | None = None, objective: Objective | None = None) -> tuple[StepPlan, float]:
    """Score, decide, and run forward and backward over this process's kept rows; returns the plan
    and the step's loss (mean over every kept token of every process). The caller then clips,
    steps the optimizer and zeroes the gradients. `model` may be wrapped in DDP: gradients are
    then reduced at the last micro-batch only. `chunk_tokens`, `head_impl`: see `qtune.head`.
    `clock` receives the phases' seconds (`qtune.phases`): score, select, pack, forward, backward.
    `kept_row_layout`: see `concatenates_kept_rows`. `scorer`: where the scores come from
    (default: the model itself, every layer, every visit). `objective`: the token objective
    (`qtune.objectives`; default cross-entropy)."""
    clock = clock or PhaseClock()
    scorer = scorer or Scorer(chunk_tokens=chunk_tokens, head_impl=head_impl)
    # The no-grad pass needs no DDP wrapper (FSDP2 has none: it shards the module in place).
    unwrapped = getattr(model, "module", model)
    scores = None
    if method.needs_scores_at(step, total_steps):
        with clock.phase("score"):
            scores = scorer(unwrapped, batches, method.entropy_over)
    plan = plan_step(batches, scores, method, step, pad_token_id=pad_token_id, triage_scope=triage_scope,
                     clock=clock, concatenate=concatenates_kept_rows(unwrapped, kept_row_layout))
    total = torch.zeros((), device=batches[0]["input_ids"].device)
    for i, micro_batch in enumerate(plan.micro_batches):
        last = i == len(plan.micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with clock.phase("forward"):
                loss = micro_batch_loss(model, micro_batch, plan.loss_tokens, plan.world_size,
                                        unwrapped=unwrapped, head_impl=head_impl, chunk_tokens=chunk_tokens,
                                        objective=objective)
            with clock.phase("backward"):
                loss.backward()
        total += loss.detach()
    return plan, float(reduce_sum(total)) / plan.world_size

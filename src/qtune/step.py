"""One training step with dynamic pruning, framework-free: plain functions on a model and the
step's micro-batches, usable from the transformers Trainer (`qtune.trainer`), TRL or a plain loop.

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
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .errors import QTuneError
from .head import accepts_logits_to_keep, head_forward, linear_cross_entropy, resolve_head_impl
from .loss_terms import chunked_entropy_weights, linear_kl_divergence
from .methods import Decision, Method, Selection, response_mask_of
from .models import base_model
from .objectives import GOLD_OBJECTIVES, Objective, entropy_weights, proximal_value_and_weight
from .phases import PhaseClock
from .processes import gather, world
from .reference_policy import ReferencePolicy
from .scorer import Scorer
from .scoring import BatchScores, chunked_token_statistics

TRIAGE_SCOPES = ("global", "local")


def to_device(value, device):
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
    mine = (([to_device(b, "cpu") for b in batches],
             None if scores is None else [to_device(s, "cpu") for s in scores])
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
                     return_outputs: bool = False, head_impl: str = "auto", chunk_tokens: int | None = None,
                     objective: Objective | None = None, reference: ReferencePolicy | None = None):
    """This process's share of the step's loss on one packed micro-batch: sum of (weighted) token
    cross-entropies / the step's kept tokens over every process, times the world size (see the
    module's rules). `unwrapped`: the model inside a DDP/FSDP wrapper, to see which arguments it
    takes. `objective`: a token objective in place of cross-entropy (`qtune.objectives`; None or
    "nll": cross-entropy). `reference`: the policy the objective compares with, if it does (ASFT's
    base model, PSFT's old policy: `qtune.reference_policy`), run without gradient on the same rows.

    Only positions that predict a kept label reach the output projection (prompt, padding and
    pruned tokens cost none). `head_impl` (see `qtune.head`): "chunked" computes the loss and
    its gradient a chunk of positions at a time from the body's hidden states (`chunk_tokens`
    positions, None: sized to the work by `qtune.head.working_block`), "liger" with
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
    if objective is not None and objective.reference is not None and reference is None:
        raise QTuneError(f"--loss {objective.name} compares the model with another policy: give micro_batch_loss "
                         "its reference= (qtune.reference_policy.reference_policy)")
    impl = resolve_head_impl(target, head_impl, weighted=weights is not None or objective is not None)
    split = predicting = None
    if accepts_logits_to_keep(target):
        predicting = torch.zeros_like(labels, dtype=torch.bool)
        predicting[:, :-1] = targets_mask
        split = head_forward(model, inputs, predicting) if impl != "logits" else None
        if split is None:
            outputs = model(**inputs, logits_to_keep=predicting)
            logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
    else:
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1][targets_mask]
    other = None
    if objective is not None and objective.reference is not None:
        other = _reference_forward(reference, target, inputs, predicting, targets_mask, split is not None)
    if split is not None:
        outputs, hidden, head = split
        loss = chunked_objective_loss(hidden, head, targets, weights, objective, other, impl, chunk_tokens)
    else:
        loss = logits_objective_loss(logits, targets, weights, objective, other)
    loss = loss / loss_tokens * world_size
    return (loss, outputs) if return_outputs else loss


def _reference_forward(reference: ReferencePolicy, target, inputs: dict, predicting, targets_mask, split: bool):
    """The reference policy on the micro-batch, without gradient: (hidden states, head) at the
    predicting positions when the trained model's head is split off, else its logits there. The
    head's weight and bias are taken inside the policy's context (detached views: PSFT's old policy
    swaps its weights back when the context ends)."""
    with torch.no_grad(), reference.applied(target) as policy:
        if split:
            found = head_forward(policy, inputs, predicting)
            if found is None:
                raise QTuneError("the reference policy transforms its logits after its head, the trained model does "
                                 "not: they must be the same architecture")
            _, hidden, head = found
            bias = None if head.bias is None else head.bias.detach()
            return hidden, types.SimpleNamespace(weight=head.weight.detach(), bias=bias)
        if predicting is not None:
            logits = policy(**inputs, logits_to_keep=predicting).logits
            return logits.reshape(-1, logits.shape[-1])
        return policy(**inputs).logits[:, :-1][targets_mask]


def _times(weights: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor:
    return factor if weights is None else weights * factor


def chunked_objective_loss(hidden, head, targets, weights, objective: Objective | None, other, impl: str = "chunked",
                           chunk_tokens: int | None = None) -> torch.Tensor:
    """The summed loss of `objective` (None: NLL) over positions with hidden states [n, d] at the head's
    input and gold tokens `targets` [n], each weighted by `weights` (None: 1), computed a chunk of
    positions at a time (`qtune.head`, `qtune.loss_terms`). `other`: the reference policy's (hidden
    states, head) at the same positions, for an objective that compares with one."""
    if objective is None or objective.name in GOLD_OBJECTIVES:
        return linear_cross_entropy(hidden, head, targets, weights, chunk_tokens=chunk_tokens, impl=impl,
                                    objective=objective)
    if objective.name == "eaft":
        entropy = chunked_entropy_weights(hidden, head, top_k=objective.top_k, alpha=objective.alpha,
                                          chunk_tokens=chunk_tokens)
        return linear_cross_entropy(hidden, head, targets, _times(weights, entropy), chunk_tokens=chunk_tokens)
    ref_hidden, ref_head = other
    if objective.name == "psft":
        logp = -chunked_token_statistics(hidden.detach(), head, targets, chunk_tokens=chunk_tokens)[0]
        logp_old = -chunked_token_statistics(ref_hidden, ref_head, targets, chunk_tokens=chunk_tokens)[0]
        value, slope = proximal_value_and_weight(logp, logp_old, objective.clip)
        surrogate = linear_cross_entropy(hidden, head, targets, _times(weights, slope), chunk_tokens=chunk_tokens)
        return _with_value(surrogate, _times(weights, value).sum())
    anchor = linear_kl_divergence(hidden, head, ref_hidden, ref_head, weights, chunk_tokens=chunk_tokens)
    return (linear_cross_entropy(hidden, head, targets, weights, chunk_tokens=chunk_tokens, objective=objective.gold)
            + objective.kl_weight * anchor)


def logits_objective_loss(logits, targets, weights, objective: Objective | None, other) -> torch.Tensor:
    """The same as `chunked_objective_loss` from the logits [n, V] of the positions (a head that cannot
    be split off); `other`: the reference policy's logits there."""
    if objective is None and weights is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    if objective is None:
        pass
    elif objective.name in GOLD_OBJECTIVES:
        token_loss = objective(-token_loss)
    elif objective.name == "eaft":
        token_loss = token_loss * entropy_weights(logits, objective.top_k, objective.alpha)
    elif objective.name == "psft":
        logp_old = -F.cross_entropy(other.float(), targets, reduction="none")
        value, slope = proximal_value_and_weight(-token_loss, logp_old, objective.clip)
        token_loss = _with_value(token_loss * slope, value)
    else:
        anchor = F.kl_div(torch.log_softmax(logits.float(), dim=-1), torch.softmax(other.float(), dim=-1),
                          reduction="none").sum(dim=-1)
        token_loss = objective.gold(-token_loss) + objective.kl_weight * anchor
    return token_loss.sum() if weights is None else (token_loss * weights).sum()


def _with_value(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (detached) with the gradient of `surrogate`: PSFT's loss is -min(r, 1 + eps), its
    gradient that of cross-entropy weighted by r where the ratio is not clipped."""
    return surrogate - surrogate.detach() + value


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
               triage_scope: str = "global", chunk_tokens: int | None = None, head_impl: str = "auto",
               clock: PhaseClock | None = None, kept_row_layout: str = "auto",
               scorer: Scorer | None = None, objective: Objective | None = None,
               reference: ReferencePolicy | None = None) -> tuple[StepPlan, float]:
    """Score, decide, and run forward and backward over this process's kept rows; returns the plan
    and the step's loss (mean over every kept token of every process). The caller then clips,
    steps the optimizer and zeroes the gradients. `model` may be wrapped in DDP: gradients are
    then reduced at the last micro-batch only. `chunk_tokens`, `head_impl`: see `qtune.head`.
    `clock` receives the phases' seconds (`qtune.phases`): score, select, pack, forward, backward.
    `kept_row_layout`: see `concatenates_kept_rows`. `scorer`: where the scores come from
    (default: the model itself, every layer, every visit). `objective`: the token objective
    (`qtune.objectives`; default cross-entropy); `reference`: the policy it compares with, if it
    does (`qtune.reference_policy`)."""
    clock = clock or PhaseClock()
    scorer = scorer or Scorer(chunk_tokens=chunk_tokens, head_impl=head_impl)
    # The no-grad pass needs no DDP wrapper (FSDP2 has none: it shards the module in place).
    unwrapped = getattr(model, "module", model)
    if reference is not None:
        reference.begin_step(unwrapped, step)
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
                                        objective=objective, reference=reference)
            with clock.phase("backward"):
                loss.backward()
        total += loss.detach()
    return plan, float(reduce_sum(total)) / plan.world_size

"""What each audited selector and rule decides on the planted sample, scored once.

`score_batches` cuts the sample's tokenized samples into batches of `batch_size` in a seeded
length-grouped order (`qtune.data.length_bucketed_batches`, as training groups its steps) and
scores each batch once with a `qtune.scorer.Scorer` (no-grad, the weights as given; the attention
and a reference model's NLL too when a token rule needs them), keeping batch and scores on the
CPU. Every rule then decides on these scores: nothing is scored twice (the `ifd` selector's
answers-alone pass and `less`'s gradients aside, which `qtune.selection.selector_inputs` adds).

The decisions are written as step rows {"sample_ids", "kept_ids"}, the fields of a training run's
step log, so that one function counts them all (`drop_counts`, by `qtune.report.pruning_audit`):

- `rule_rows`: a per-batch method (Q-Tuning, or a sample rule as "RULE+all"), batch i taken as
  optimizer step i (a rule's random draws depend on the step, as in training; InfoBatch is never
  in its final annealing phase, since the audit gives no run length);
- `selection_rows`: a static selection over the whole sample, as one row.

For token rules, `token_masks` gives each batch's label mask on every row (as if every sample
were kept) and `tally_tokens` counts the pruned planted tokens and the pruned other tokens of the
same answers.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..data import collate, length_bucketed_batches
from ..methods import TOKEN_RULES, build_method
from ..methods.random import step_generator
from ..processes import Processes, run_batches
from ..report import pruning_audit
from ..scoring import BatchScores, DatasetScores, dataset_scores, sample_rows
from ..step import to_device


@dataclass
class ScoredBatch:
    """One batch of the audit (collated, on the CPU) and its scores (on the CPU)."""

    batch: dict
    scores: BatchScores


def score_batches(model, samples, scorer, *, pad_token_id: int, batch_size: int, seed: int,
                  progress: bool = True, processes: Processes | None = None) -> tuple[list[ScoredBatch], DatasetScores]:
    """The scored batches (see the module doc) and the same scores per sample (`DatasetScores`,
    with per-token NLL and entropy, in ascending sample id) for the static selectors. With
    `processes` (every process calling), the batches are shared out (`qtune.processes.run_batches`)
    and every process gets all of them, in order; the progress bar is the main process's."""
    from tqdm.auto import tqdm

    processes = processes or Processes()
    device = next(model.parameters()).device
    lengths = getattr(samples, "lengths", None)
    lengths = [len(s["input_ids"]) for s in samples] if lengths is None else lengths.tolist()
    batches = length_bucketed_batches(lengths, batch_size, shuffle=True, seed=seed)
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=len(samples), unit="sample", desc="scoring", disable=not (progress and processes.is_main))

    def run(indices: list[int]) -> dict[int, ScoredBatch]:
        nonlocal tokens
        batch = collate([samples[i] for i in indices], pad_token_id)
        scores = to_device(scorer(model, [to_device(batch, device)])[0], "cpu")
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(tok_s=f"{tokens * processes.world / max(time.perf_counter() - start, 1e-9):,.0f}",
                        refresh=False)
        return {indices[0]: ScoredBatch(batch, scores)}  # batches are disjoint: the first index names one

    scored = run_batches(run, batches, processes, progress_bar=bar)
    bar.close()
    out = [scored[indices[0]] for indices in batches]
    rows = {}
    for b in out:
        rows.update(sample_rows(b.batch["sample_id"], b.scores, per_token=True))
    return out, dataset_scores(rows, per_token=True, seconds=time.perf_counter() - start,
                               tokens=processes.total(tokens))


def rule_rows(method, batches: list[ScoredBatch]) -> list[dict]:
    """The step rows of a per-batch method: batch i decided as step i."""
    rows = []
    for step, b in enumerate(batches):
        kept = method.select([b.batch], [b.scores], step).selections[0].rows.cpu()
        ids = b.batch["sample_id"]
        rows.append({"sample_ids": ids.tolist(), "kept_ids": ids[kept].tolist()})
    return rows


def selection_rows(sample_ids: list[int], kept_ids: Iterable[int]) -> list[dict]:
    """The one step row of a static selection."""
    return [{"sample_ids": list(sample_ids), "kept_ids": sorted(kept_ids)}]


def drop_counts(steps: list[dict], group_of: dict[int, str]) -> dict[str, tuple[int, int]]:
    """(dropped, seen) per group (`group_of`: record id -> its group) over step rows."""
    return {group: (row["seen"] - row["kept"], row["seen"]) for group, row in pruning_audit(steps, group_of).items()}


def token_masks(name: str, cfg, batches: list[ScoredBatch]) -> list[torch.Tensor]:
    """Per batch, bool [B, L]: the response tokens that keep their loss under token rule `name`
    on every row, or "qtuning": Q-Tuning's Stage 2 (its neighbour-aware token score) on every
    sample (`stages="token"`). `cfg` holds the rules' options (an `AuditConfig`)."""
    if name == "qtuning":
        method = build_method("qtuning", dataclasses.replace(cfg, stages="token"))
        return [method.select([b.batch], [b.scores], step).selections[0].label_mask.cpu()
                for step, b in enumerate(batches)]
    rule = TOKEN_RULES[name]
    config = build_method(f"random+{name}", cfg).config  # the rule's options, as a composed method has them
    if rule.pass_needs:  # decided once over every token of the sample (token_cleaning)
        values = {}
        for b in batches:
            values.update(zip(b.batch["sample_id"].tolist(), rule.pass_values(config, b.scores)))
        fixed = rule.fix_masks(config, values)
        return [fixed.label_mask(b.batch) for b in batches]
    return [rule.masks(config, b.batch, b.scores, step_generator(cfg.seed, step)).cpu()
            for step, b in enumerate(batches)]


def pruned_tokens(masks: list[torch.Tensor], batches: list[ScoredBatch]) -> Iterable[tuple[int, list[bool]]]:
    """(sample id, whether each of its response tokens was pruned, in order) of every sample."""
    for mask, b in zip(masks, batches):
        response = b.scores.response_mask
        for row, sample_id in enumerate(b.batch["sample_id"].tolist()):
            yield sample_id, (~mask[row])[response[row]].tolist()


def tally_tokens(pruned: Iterable[tuple[int, list[bool]]], flags: dict[int, list[bool]]) -> dict[str, list[int]]:
    """{"planted": [pruned, total], "other": [pruned, total]} over the samples that have planted
    token flags (`flags`: sample id -> per response token, whether it is planted): the planted
    tokens, and the other response tokens of the same samples."""
    counts = {"planted": [0, 0], "other": [0, 0]}
    for sample_id, cut in pruned:
        planted = flags.get(sample_id)
        if planted is None or len(planted) != len(cut):
            continue
        for is_cut, is_planted in zip(cut, planted):
            group = counts["planted" if is_planted else "other"]
            group[0] += is_cut
            group[1] += 1
    return counts

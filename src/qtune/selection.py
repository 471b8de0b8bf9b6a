"""`qtune select` as a Python function: static data selection, `run_select(SelectConfig(...))`.

One scoring pass of the whole dataset with the given model (`qtune.scoring.score_dataset`;
skipped with `scores=False` where the selector does not rank by it, and then the model is not
loaded unless the selector uses it; the `ifd` selector scores the responses alone too; `less`
trains LoRA adapters on the model and takes per-sample gradients, of --target-data's samples
too), then the selector (`qtune.selectors`, or a method's `select_dataset`) chooses the samples.
Written atomically into OUT:

- selected.jsonl: the chosen records' rows as they are in the input (same fields, so `qtune
  train` or any trainer reads them with the same --format), in input order; a record whose
  conversation is split per assistant turn is written when any of its samples is chosen;
- scores.parquet: per sample its id, record id, PPL and entropy (not with `scores=False`), the
  selector's score, kept;
- summary.json: selector, direction, ratio, counts, the selector's statistics, seconds, machine;
- selection.png: the selector's score, histogram of kept and dropped samples (with --plot).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import STATIC_METHODS, SelectConfig, TrainConfig
from .console import log
from .data import record_id_of, source_rows
from .errors import QTuneError
from .io import write_json, write_jsonl, write_parquet
from .models import machine_stamp
from .processes import Processes, claim_output_on_main, launched_processes
from .samples import load_samples
from .scoring import IGNORE_INDEX, score_dataset, unscored_dataset
from .selectors import SELECTORS, SelectorInputs, StaticChoice
from .workflows import load_for_scoring


def run_select(cfg: SelectConfig) -> dict:
    """Score a dataset, choose a subset with `cfg.selector` and write it (see the module doc).
    Under a launcher (torchrun, accelerate launch) the processes share the model's passes over the
    dataset (`qtune.processes`), the main process chooses (every process, for a selector that runs
    the model) and writes; it returns the summary, the other processes an empty dict."""
    processes = launched_processes(cfg.device, "qtune select")
    with claim_output_on_main(processes, cfg.out, "qtune select"):
        return _select(cfg, Path(cfg.out), processes)


def answer_only(samples, bos_token_id: int | None) -> list[dict]:
    """Each sample's response tokens alone (after BOS when there is one), every one a label: the
    answer without its instruction, for s(A) of the IFD."""
    out = []
    for i in range(len(samples)):
        sample = samples[i]
        ids, labels = list(sample["input_ids"]), list(sample["labels"])
        response = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        start = [bos_token_id] if bos_token_id is not None else []
        ids = start + response
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [IGNORE_INDEX] * len(start) + response, "sample_id": sample["sample_id"]})
    return out


def load_target(cfg: SelectConfig, tokenizer, *, format: str | None = None) -> tuple[object, list[dict]]:
    """The tokenized samples of --target-data (read with the data options of --data, every record;
    in `format` when given, else --format) and each one's record's metadata."""
    if not cfg.target_data:
        raise QTuneError(f"the {cfg.selector} selector needs --target-data: a file of examples of the target task "
                         "(e.g. a dev split, in any format --data takes)")
    log(f"reading the target set {cfg.target_data}")
    options = dict(data=cfg.target_data, limit=None) | ({} if format is None else {"format": format})
    records, samples = load_samples(dataclasses.replace(cfg, **options), tokenizer)
    metadata = {r.sample_id: r.metadata for r in records}
    return samples, [metadata[record_id_of(samples[i]["sample_id"])] for i in range(len(samples))]


def selector_inputs(selector, cfg: SelectConfig, scores, *, records, samples, model, tokenizer, pad_id: int,
                    score: dict, processes: Processes | None = None,
                    target_format: str | None = None) -> SelectorInputs:
    """What `selector` needs (its `needs`, see `qtune.selectors`) besides the scoring pass `scores`:
    the answers scored alone (a second pass, with `score_dataset`'s options `score`, shared over
    `processes`), the records' texts, pairs and metadata, the model and samples, or the target set
    of `cfg.target_data` (in `target_format` when given: the audit reads its planted sample as
    messages, the target set in the user's format). One process without `processes`."""
    inputs = SelectorInputs(scores, processes=processes or Processes())
    if "answer_scores" in selector.needs:
        log("scoring the answers without their instructions")
        inputs.answer_scores = score_dataset(model, answer_only(samples, tokenizer.bos_token_id), **score)
    if "texts" in selector.needs:
        by_id = {r.sample_id: r for r in records}
        rows = [by_id[record_id_of(s)] for s in scores.sample_id]
        inputs.texts = ["\n".join(m["content"] for m in r.messages) for r in rows]
        inputs.pairs = [("\n".join(m["content"] for m in r.messages if m["role"] != "assistant"),
                         "\n".join(m["content"] for m in r.messages if m["role"] == "assistant")) for r in rows]
        inputs.metadata = [r.metadata for r in rows]
    if "model" in selector.needs:
        inputs.model, inputs.samples, inputs.pad_token_id = model, samples, pad_id
    if "target" in selector.needs:
        inputs.target_samples, inputs.target_metadata = load_target(cfg, tokenizer, format=target_format)
    return inputs


def _static_method(cfg: SelectConfig):
    """The pruning method whose static selection `cfg.selector` names."""
    from .methods import build_method

    return build_method(cfg.selector, TrainConfig(model=cfg.model, data=cfg.data, out=cfg.out, method=cfg.selector,
                                                  r_sample=cfg.ratio, seed=cfg.seed))


def _method_choice(cfg: SelectConfig, method, scores) -> StaticChoice:
    chosen = method.select_dataset(scores)
    direction = {"full": "every sample", "random": "a uniform draw", "qtuning": "Q2 + Q4 of a dataset-wide triage"}
    return StaticChoice(list(chosen.sample_ids), None, direction[cfg.selector])


def _select(cfg: SelectConfig, out: Path, processes: Processes) -> dict:
    method = _static_method(cfg) if cfg.selector in STATIC_METHODS else None
    selector = SELECTORS[cfg.selector]() if method is None else None
    # A method's static selection ranks by the scores when its steps do (qtuning's triage).
    needs = selector.needs if method is None else frozenset({"scores"} if method.needs else ())
    if not cfg.scores and "scores" in needs:
        raise QTuneError(f"the {cfg.selector} selector ranks by the scoring pass's perplexity; it cannot run with "
                         "--no-scores")
    tokenizer, pad_id, records, samples, model = load_for_scoring(cfg, with_model=cfg.scores or "model" in needs,
                                                                  device=processes.device)
    score = dict(pad_token_id=pad_id, batch_size=cfg.batch_size, chunk_tokens=cfg.chunk_tokens,
                 head_impl=cfg.head_impl, processes=processes)
    if cfg.scores:
        unused = "" if "scores" in needs else " (only for scores.parquet: --no-scores skips this pass)"
        on = f"{model.device}" + (f" x {processes.world} processes" if processes.world > 1 else "")
        log(f"scoring {len(samples)} samples with {cfg.model} on {on} for the {cfg.selector} selector{unused}")
        scores = score_dataset(model, samples, per_token=cfg.selector == "qtuning", **score)
    else:
        scores = unscored_dataset(samples)
    seconds = scores.seconds
    # Past the scoring pass, a process other than the main one works only for a selector whose own
    # passes it shares (answers scored alone, `shares_passes` selectors); the main process chooses
    # and writes OUT.
    shared = "answer_scores" in needs or getattr(selector, "shares_passes", False)
    if not processes.is_main and (method is not None or not shared):
        return {}
    if method is not None:
        choice = _method_choice(cfg, method, scores)
    else:
        inputs = selector_inputs(selector, cfg, scores, records=records, samples=samples, model=model,
                                 tokenizer=tokenizer, pad_id=pad_id, score=score, processes=processes)
        if inputs.answer_scores is not None:
            seconds += inputs.answer_scores.seconds
        choice = selector.choose(cfg, inputs)
    if not processes.is_main:
        return {}

    kept = set(choice.kept)
    kept_records = sorted({record_id_of(s) for s in kept})
    write_jsonl(out / "selected.jsonl", source_rows(cfg.data, kept_records))
    columns = {"sample_id": scores.sample_id, "record_id": [record_id_of(s) for s in scores.sample_id]}
    if scores.ppl is not None:
        columns.update(ppl=scores.ppl, entropy=scores.ent)
    columns["kept"] = [s in kept for s in scores.sample_id]
    if choice.score is not None:
        columns["score"] = [float(v) for v in choice.score]
    write_parquet(out / "scores.parquet", columns)
    summary = {
        "selector": cfg.selector, "direction": choice.direction, "ratio": cfg.ratio,
        "n_samples": len(scores.sample_id), "n_kept": len(kept), "n_records": len(records),
        "n_records_kept": len(kept_records), "kept_fraction": len(kept) / len(scores.sample_id),
        "stats": choice.stats, "scoring_seconds": seconds, "config": dataclasses.asdict(cfg),
        "machine": machine_stamp("cpu" if model is None else model.device, processes.world),
    }
    write_json(out / "summary.json", summary)
    if cfg.plot and choice.score is not None:
        from .plotting import plot_selection

        plot_selection(out / "selection.png", choice.score, columns["kept"],
                       title=f"{cfg.selector} ({choice.direction}): {len(kept)} of {len(scores.sample_id)} kept")
    print(json.dumps({k: summary[k] for k in ("selector", "direction", "n_samples", "n_kept", "n_records_kept")}))
    log(f"wrote {out / 'selected.jsonl'} ({len(kept_records)} records), {out / 'scores.parquet'}, "
        f"{out / 'summary.json'}")
    return summary

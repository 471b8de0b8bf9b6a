"""`qtune score` and `qtune eval` as Python functions: `qtune score` is `run_score(ScoreConfig(...))`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .config import EvalConfig, EvalRunConfig, ScoreConfig
from .console import log
from .data import load_records, record_id_of, require_pad_token
from .io import claim_output_dir, write_json, write_parquet, write_text
from .models import check_vocabulary, load_model, load_tokenizer, machine_stamp
from .processes import Processes, claim_output_on_main, launched_processes
from .pruning import QUADRANT_NAMES, triage
from .report import category_quadrant_table, format_table, score_summary
from .samples import load_samples
from .scoring import score_dataset


def run_score(cfg: ScoreConfig) -> dict:
    """Score every sample of a dataset on the EU plane and write scores, summary and plot. Under a
    launcher (torchrun, accelerate launch) the processes share the scoring pass and the main one
    writes (`qtune.processes`); every process returns the summary."""
    processes = launched_processes(cfg.device, "qtune score")
    # A bad or busy --out fails (every process) before anything loads.
    with claim_output_on_main(processes, cfg.out, "qtune score"):
        return _score(cfg, Path(cfg.out), processes)


def load_for_scoring(cfg, *, with_model: bool = True, device: str | torch.device | None = None):
    """(tokenizer, its pad id, records, tokenized samples, model) of a config with model and data
    fields: what a command that scores a dataset starts from (model None without `with_model`;
    on `device`, default `cfg.device`)."""
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, pad_token=cfg.pad_token)
    pad_id = require_pad_token(tokenizer)
    records, samples = load_samples(cfg, tokenizer)
    if not with_model:
        return tokenizer, pad_id, records, samples, None
    model = load_model(cfg.model, dtype=cfg.dtype, device=str(device or cfg.device),
                       trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(model, tokenizer, cfg.model)
    return tokenizer, pad_id, records, samples, model


def _score(cfg: ScoreConfig, out: Path, processes: Processes) -> dict:
    """run_score's work, in its claimed folder (claimed by the main process)."""
    _, pad_id, records, samples, model = load_for_scoring(cfg, device=processes.device)
    on = f"{model.device}" + (f" x {processes.world} processes" if processes.world > 1 else "")
    log(f"scoring {len(samples)} samples with {cfg.model} on {on} ({model.dtype})")
    scores = score_dataset(
        model, samples, pad_token_id=pad_id, batch_size=cfg.batch_size,
        per_token=cfg.per_token, chunk_tokens=cfg.chunk_tokens, head_impl=cfg.head_impl, processes=processes,
    )
    decision = triage(torch.tensor(scores.ppl), torch.tensor(scores.ent), cfg.r_sample)
    quadrant = decision.quadrant.tolist()
    kept = set(decision.keep.tolist())
    meta = {r.sample_id: r.metadata for r in records}
    records_of = [meta[record_id_of(s)] for s in scores.sample_id]  # a conversation split per turn shares its record
    categories = [str(m.get("category")) for m in records_of] if any("category" in m for m in records_of) else None

    columns = {
        "sample_id": scores.sample_id,
        "n_response": scores.n_response,
        "ppl": scores.ppl,
        "entropy": scores.ent,
        "quadrant": quadrant,
        "quadrant_name": [QUADRANT_NAMES[q] for q in quadrant],
        "kept": [i in kept for i in range(len(quadrant))],
        "metadata": [json.dumps(m, sort_keys=True) for m in records_of],
    }
    if categories is not None:
        columns["category"] = categories
    if cfg.per_token:
        columns["token_nll"] = scores.token_nll
        columns["token_entropy"] = scores.token_entropy

    summary = score_summary(scores.ppl, scores.ent, quadrant, cfg.r_sample)
    if categories is not None:
        summary += "\n\n" + category_quadrant_table(categories, quadrant)
    throughput = (f"{len(samples)} samples, {scores.tokens} tokens in {scores.seconds:.1f} s "
                  f"({len(samples) / scores.seconds:.1f} samples/s, {scores.tokens / scores.seconds:,.0f} tokens/s)")
    summary += "\n\n" + throughput
    result = {
        "config": asdict(cfg),
        "n_samples": len(samples),
        "thresholds": decision.thresholds,
        "level": decision.level,
        "counts": decision.counts(),
        "seconds": scores.seconds,
        "tokens": scores.tokens,
        "machine": machine_stamp(model.device, processes.world),
    }
    if not processes.is_main:  # the main process writes OUT
        return result
    write_parquet(out / "scores.parquet", columns)
    write_text(out / "summary.md", summary + "\n")
    write_json(out / "summary.json", result)
    if cfg.plot:
        from .plotting import plot_eu_plane

        plot_eu_plane(out / "eu_plane.png", scores.ppl, scores.ent, quadrant, decision.thresholds,
                      title=f"EU plane: {Path(cfg.data).name} (r_sample={cfg.r_sample:g})", categories=categories)
    print(summary)
    log(f"wrote {out / 'scores.parquet'}, {out / 'summary.md'}" + (f", {out / 'eu_plane.png'}" if cfg.plot else ""))
    return result


def corpus_perplexity(model, samples: list[dict], pad_token_id: int, batch_size: int) -> dict:
    """Token-level perplexity of the reference responses: exp(total NLL / total tokens)."""
    import math

    scores = score_dataset(model, samples, pad_token_id=pad_token_id, batch_size=batch_size, progress=False)
    total_nll = sum(math.log(p) * n for p, n in zip(scores.ppl, scores.n_response))
    tokens = sum(scores.n_response)
    return {"perplexity": math.exp(total_nll / tokens), "perplexity_tokens": tokens}


def run_eval(cfg: EvalRunConfig) -> dict:
    """Generation-based exact match (and held-out perplexity) of a model on a dataset."""
    with claim_output_dir(cfg.out, "qtune eval"):  # a bad or busy --out fails before anything loads
        return _evaluate(cfg)


def _evaluate(cfg: EvalRunConfig) -> dict:
    """run_eval's work, in its claimed folder."""
    from dataclasses import fields

    from .evaluate import evaluate_exact_match, write_eval_outputs

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, pad_token=cfg.pad_token)
    records, report = load_records(cfg.data, cfg.format, skip_invalid=cfg.skip_invalid, limit=cfg.limit)
    if report.skipped:
        log(report.summary())
    fewshot = load_records(cfg.fewshot_data, cfg.format)[0] if cfg.fewshot_data else None
    model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(model, tokenizer, cfg.model)
    generation = EvalConfig(**{f.name: getattr(cfg, f.name) for f in fields(EvalConfig)})
    metrics, predictions = evaluate_exact_match(model, tokenizer, records, generation, fewshot_records=fewshot)
    if cfg.perplexity:
        _, samples = load_samples(cfg, tokenizer)
        metrics.update(corpus_perplexity(model, samples, require_pad_token(tokenizer), cfg.batch_size))
    metrics.update({"model": cfg.model, "data": cfg.data})
    write_eval_outputs(cfg.out, metrics, predictions)
    rows = [[k, metrics[k]] for k in ("n", "exact_match_strict", "exact_match_flexible", "perplexity")
            if metrics.get(k) is not None]
    print(format_table(["metric", "value"], rows))
    log(f"wrote {Path(cfg.out) / 'predictions.jsonl'} and {Path(cfg.out) / 'metrics.json'}")
    return metrics

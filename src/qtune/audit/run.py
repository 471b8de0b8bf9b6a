"""`qtune audit` as a Python function: `run_audit(AuditConfig(...))` (docs/audit.md).

1. Draw --sample records of --data and plant labelled defects into a copy (`planting`), written
   to OUT/planted.jsonl; with --eval-data, count the overlap of --data with it
   (`qtune.contamination`).
2. Score the planted sample once, batch by batch (`decisions.score_batches`), with a progress bar.
3. Decide on those scores: Q-Tuning's triage, then every sample rule, per batch; every token rule,
   Q-Tuning's Stage 2 first; every static selector (`less`, `grads` and `thtb` only when named).
   The random rule and the random selection are each family's reference.
4. With --steps, a short training run of --method on the planted sample (`dynamic`).
5. Judge every method's drop share per planted kind against its drop share of untouched records
   (`verdict`), and write audit.json, audit.md and audit.html (`outputs`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import STATIC_METHODS, AuditConfig, SelectConfig
from ..console import log
from ..contamination import find_contamination
from ..data import load_records, record_id_of
from ..errors import QTuneError
from ..io import write_jsonl
from ..methods import SAMPLE_RULES, TOKEN_RULES, build_method
from ..models import machine_stamp
from ..pruning import triage
from ..scorer import build_scorer
from ..processes import Processes, claim_output_on_main, launched_processes
from ..selection import selector_inputs
from ..selectors import SELECTORS
from ..workflows import load_for_scoring
from .decisions import (drop_counts, pruned_tokens, rule_rows, score_batches, selection_rows, tally_tokens,
                        token_masks)
from .outputs import NOT_A_REAL_DEFECT, write_figures, write_outputs
from .planting import KINDS, UNPLANTED_DEFECTIVE, UNTOUCHED, draw_sample, plant
from .spans import response_token_flags
from .verdict import summarize

#: Words for the token audit's two groups in the sentences.
TOKEN_WORDS = {"planted": "the planted tokens of corrupted answers"}


def run_audit(cfg: AuditConfig) -> dict:
    """Plant, score, decide, judge and write (see the module doc); returns audit.json's content.
    Under a launcher (torchrun, accelerate launch) the processes share the scoring pass and the
    selectors' own shared passes (`qtune.processes`); the main process decides, writes and returns
    the result, the others an empty dict."""
    chosen = _chosen_names(cfg)  # a bad combination of options fails before anything is read
    processes = launched_processes(cfg.device, "qtune audit")
    if processes.world > 1 and cfg.steps:
        raise QTuneError("--steps: the audit's training run is a one-process run; run qtune audit --steps without a "
                         "launcher (the scoring pass and the selectors share out over processes without --steps)")
    with claim_output_on_main(processes, cfg.out, "qtune audit"):
        return _audit(cfg, Path(cfg.out), *chosen, processes=processes)


def _listed(value: str | None) -> list[str] | None:
    """The names of a comma-separated option, None when it is not given, [] for "none"."""
    if value is None:
        return None
    return [] if value.strip() == "none" else list(dict.fromkeys(n.strip() for n in value.split(",")))


def _with_random_first(names: list[str]) -> list[str]:
    """`names` with the reference, random, first (none when the family is not audited)."""
    return ["random", *(n for n in names if n != "random")] if names else []


def _chosen_names(cfg: AuditConfig) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """(sample rules, token rules, selectors, skipped: name -> why) of the audit."""
    skipped = {}
    rules = _listed(cfg.rules)
    if rules is None:
        rules = sorted(name for name, rule in SAMPLE_RULES.items() if not rule.needs_metadata)
    labelled = [name for name in rules if SAMPLE_RULES[name].needs_metadata]
    if labelled:
        raise QTuneError(f"--rules: {', '.join(labelled)} read the records' ground-truth labels (controls of "
                         "experiments): the audit's own labels are what it measures, so they cannot be audited")
    tokens = _listed(cfg.token_rules)
    if tokens is None:
        tokens = sorted(name for name in TOKEN_RULES if name != "all")
        for name in [n for n in tokens if _needs_reference(n) and not cfg.reference_model]:
            tokens.remove(name)
            skipped[f"token:{name}"] = "compares with a reference model: give --reference-model to audit it"
    missing = [n for n in tokens if _needs_reference(n) and not cfg.reference_model]
    if missing:
        raise QTuneError(f"--token-rules: {', '.join(missing)} compare(s) with a reference model: give "
                         "--reference-model")
    selectors = _listed(cfg.selectors)
    if selectors is None:
        selectors = sorted(set(SELECTORS) - set(NOT_BY_DEFAULT))
        skipped.update({f"selector:{name}": why for name, why in NOT_BY_DEFAULT.items()})
        if not cfg.target_data:
            selectors.remove("rds")
            skipped["selector:rds"] = "ranks by similarity to a target set: give --target-data to audit it"
    for name in ("less", "rds"):
        if name in selectors and not cfg.target_data:
            raise QTuneError(f"--selectors {name} needs --target-data: a file of examples of the target task")
    tokens = ["qtuning", *_with_random_first(tokens)] if tokens else []
    return _with_random_first(rules), tokens, _with_random_first(selectors), skipped


#: Selectors `qtune audit` runs only when named in --selectors: each trains or generates first.
NOT_BY_DEFAULT = {
    "less": "a LoRA warm-up of several epochs and a --target-data set: not audited by default, name it in "
            "--selectors to audit it",
    "grads": "a LoRA warm-up epoch and a per-sample backward pass: not audited by default, name it in --selectors "
             "to audit it",
    "thtb": "a judge model's generation per record (--judge-model): not audited by default, name it in --selectors "
            "to audit it",
}


def _needs_reference(token_rule: str) -> bool:
    rule = TOKEN_RULES[token_rule]
    return "reference_nll" in (rule.needs | rule.pass_needs)


def _method_entry(family: str, steps: list[dict], kind_of: dict[int, str], kinds: list[str]) -> dict:
    """A method's entry: every group (untouched and `kinds`) counted, n = 0 for one it never saw."""
    counts = drop_counts(steps, kind_of)
    return {"family": family, **summarize({g: counts.get(g, (0, 0)) for g in [UNTOUCHED, *kinds]}, kinds, UNTOUCHED)}


def _token_entry(pruned, flags: dict[int, list[bool]]) -> dict:
    counts = {group: tuple(value) for group, value in tally_tokens(pruned, flags).items()}
    return summarize(counts, ["planted"], "other", share_key="pruned_share", acts="prunes",
                     of_reference="the other tokens of the same answers", words=TOKEN_WORDS)


def _token_flags(planted, samples, tokenizer) -> dict[int, list[bool]]:
    """Sample id -> per response token, whether planting changed it, for the corrupted answers
    whose spans map onto their tokens (`response_token_flags`)."""
    flags = {}
    for i, sample_id in enumerate(samples.sample_ids.tolist()):
        record = planted[record_id_of(sample_id)]
        if record.metadata["audit"]["kind"] == "corrupted":
            found = response_token_flags(record, samples[i], tokenizer)
            if found is not None and any(found):
                flags[sample_id] = found
    return flags


def _select_config(cfg: AuditConfig, planted: Path, selector: str) -> SelectConfig:
    """qtune select's options for `selector` on the planted sample: the audit's of the same name, its
    ratio r_sample."""
    names = {f.name for f in dataclasses.fields(SelectConfig)}
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    values.update(data=str(planted), format="messages", limit=None, skip_invalid=False, selector=selector,
                  ratio=cfg.r_sample)
    return SelectConfig(**values)


def _audit(cfg: AuditConfig, out: Path, rules: list[str], tokens: list[str], selectors: list[str],
           skipped: dict[str, str], *, processes: Processes) -> dict:
    records, _ = load_records(cfg.data, cfg.format, skip_invalid=cfg.skip_invalid, limit=cfg.limit)
    sample = draw_sample(records, cfg.sample, cfg.seed)
    planted = plant(sample, cfg.plant, cfg.seed, into=cfg.plant_into)
    planted_path = out / "planted.jsonl"
    if processes.is_main:
        write_jsonl(planted_path, ({"messages": r.messages, "metadata": r.metadata} for r in planted))
    processes.from_main(None)  # the others read planted.jsonl once it is written
    kind_of = {r.sample_id: r.metadata["audit"]["kind"] for r in planted}
    groups = [UNTOUCHED, *KINDS] + ([UNPLANTED_DEFECTIVE] if UNPLANTED_DEFECTIVE in kind_of.values() else [])
    planted_counts = {g: sum(1 for k in kind_of.values() if k == g) for g in groups}
    log(f"planted {sum(planted_counts[k] for k in KINDS)} defects into a sample of {len(sample)} of "
        f"{len(records)} records: {planted_path}")
    contamination = None
    if cfg.eval_data:
        evaluation, _ = load_records(cfg.eval_data, "auto")
        contamination = find_contamination(records, evaluation)
        log(f"contamination: {contamination.summary()}")

    scoring = dataclasses.replace(cfg, data=str(planted_path), format="messages", limit=None, skip_invalid=False)
    tokenizer, pad_id, table, samples, model = load_for_scoring(scoring, device=processes.device)
    device = model.device
    needs = set()
    for name in tokens[1:]:
        needs |= TOKEN_RULES[name].needs | TOKEN_RULES[name].pass_needs
    for name in rules:  # the sample rules' own scores besides NLL and entropy (uds: the logits matrix's)
        needs |= SAMPLE_RULES[name].needs
    scorer = build_scorer(cfg, tokenizer, model.device, needs=frozenset(needs), dtype=cfg.dtype,
                          trust_remote_code=cfg.trust_remote_code, training_set_pass=True)
    log(f"scoring {len(samples)} samples with {cfg.model} on {model.device}, in batches of {cfg.batch_size}")
    batches, scores = score_batches(model, samples, scorer, pad_token_id=pad_id, batch_size=cfg.batch_size,
                                    seed=cfg.seed, progress=cfg.progress, processes=processes)
    if not processes.is_main:
        # The rules decide on the gathered scores alone; only the selectors that share passes need
        # this process again (in the main process's order, so the collectives pair up).
        for name in selectors:
            if getattr(SELECTORS.get(name), "shares_passes", False):
                _selector_kept(cfg, planted_path, name, scores, table, samples, model, tokenizer, pad_id, processes)
        return {}

    methods = {"qtuning": _method_entry("Q-Tuning's triage (Stage 1), per batch",
                                        rule_rows(build_method("qtuning", cfg), batches), kind_of, groups[1:])}
    for name in rules:
        steps = rule_rows(build_method(f"{name}+all", cfg), batches)
        methods[f"rule:{name}"] = _method_entry("sample rule, per batch", steps, kind_of, groups[1:])

    flags = _token_flags(planted, samples, tokenizer)
    token_rules = {name: _token_entry(pruned_tokens(token_masks(name, cfg, batches), batches), flags)
                   for name in tokens}

    explicit = cfg.selectors is not None
    for name in selectors:
        try:
            kept = _selector_kept(cfg, planted_path, name, scores, table, samples, model, tokenizer, pad_id,
                                  processes)
        except QTuneError as exc:
            if explicit:
                raise
            skipped[f"selector:{name}"] = str(exc)
            log(f"selector {name} not audited: {exc}")
            continue
        methods[f"selector:{name}"] = _method_entry(f"static selector, keeps {cfg.r_sample:g} of the sample",
                                                    selection_rows(scores.sample_id, kept), kind_of, groups[1:])

    if cfg.steps:
        from .dynamic import dynamic_steps, kept_tokens

        del model
        steps = dynamic_steps(cfg, planted_path, out / "dynamic")
        methods[f"train:{cfg.method}"] = _method_entry(f"{cfg.method} over the first {cfg.steps} training steps "
                                                       "(the model moving)", steps, kind_of, groups[1:])
        token_rules[f"train:{cfg.method}"] = _token_entry(kept_tokens(steps), flags)

    result = {
        "settings": {"data": cfg.data, "model": cfg.model, "n_records": len(records), "n_sample": len(sample),
                     "n_samples": len(samples), "plant": cfg.plant, "plant_into": cfg.plant_into, "seed": cfg.seed,
                     "batch_size": cfg.batch_size, "r_sample": cfg.r_sample, "r_token": cfg.r_token,
                     "steps": cfg.steps, "method": cfg.method if cfg.steps else None,
                     "corrupted_samples_with_token_flags": len(flags),
                     "scoring_seconds": scores.seconds, "scoring_tokens": scores.tokens,
                     "machine": machine_stamp(device, processes.world)},
        "not_a_real_defect": NOT_A_REAL_DEFECT,
        "planted": planted_counts,
        "methods": methods,
        "method_order": list(methods),  # audit.json's keys are sorted: the order of the tables
        "token_rules": token_rules,
        "token_rule_order": list(token_rules),
        "contamination": None if contamination is None else contamination.as_dict(),
        "skipped": skipped,
    }
    figures = {}
    if cfg.plot:
        quadrants = triage(torch.tensor(scores.ppl), torch.tensor(scores.ent), cfg.r_sample)
        figures = write_figures(out, result, scores.ppl, scores.ent,
                                [kind_of[record_id_of(s)] for s in scores.sample_id], quadrants.thresholds)
    paths = write_outputs(out, result, figures)
    for name, entry in methods.items():
        print(f"{name}: {entry['sentence']}")
    for name, entry in token_rules.items():
        print(f"token {name}: {entry['sentence']}")
    log(f"wrote {', '.join(str(p) for p in paths.values())}")
    return json.loads(json.dumps(result))


def _selector_kept(cfg: AuditConfig, planted: Path, name: str, scores, table, samples, model, tokenizer,
                   pad_id: int, processes: Processes) -> list[int]:
    """The sample ids that selector (or static method) `name` keeps at r_sample of the sample."""
    if name in STATIC_METHODS:
        return build_method(name, cfg).select_dataset(scores).sample_ids
    select_cfg = _select_config(cfg, planted, name)
    selector = SELECTORS[name]()
    score = dict(pad_token_id=pad_id, batch_size=cfg.batch_size, chunk_tokens=cfg.chunk_tokens,
                 head_impl=cfg.head_impl, progress=cfg.progress)
    inputs = selector_inputs(selector, select_cfg, scores, records=table, samples=samples, model=model,
                             tokenizer=tokenizer, pad_id=pad_id, score=score, processes=processes,
                             target_format=cfg.format)
    return selector.choose(select_cfg, inputs).kept

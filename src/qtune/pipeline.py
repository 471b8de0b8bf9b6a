"""`qtune pipeline`: select or prune -> SFT -> RL -> evaluate, as one config, resumable by stage.

Each stage is a qtune command run with its own options, given in the config's section of the
same name, and the pipeline feeds each stage's output to the next:

    select  qtune select  (model, data)                     -> OUT/select/selected.jsonl
    sft     qtune train   (model, the selection or data)    -> OUT/sft/model
    rl      qtune rl      (the SFT model or model; data: the section's, else the SFT data) -> OUT/rl/model
    eval    qtune eval    (eval_data) of the base model (eval_base), after SFT and after RL -> OUT/eval-<stage>/

A section that is absent (or null) skips its stage; `sft` may be pruned dynamically (its `method`,
`r_sample`, `r_token`). A stage is finished when its last file is written (`summary.json` for
select, sft and rl, `metrics.json` for an evaluation): a second run of the same config skips the
finished stages, resumes an interrupted training stage from its last complete checkpoint (one
without a complete checkpoint starts again) and runs the rest. The stages' options are recorded
in OUT/pipeline.json; a stage that has started refuses other options (delete its folder, and
those of the stages after it, or choose another --out). OUT/report.md and OUT/report.json compare
the stages: held-out accuracy after each, wall time, tokens trained; they are rewritten after
every stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import config_changes, scan
from .config import ContaminationConfig, EvalRunConfig, SelectConfig, TrainConfig, option
from .console import log
from .contamination import check_contamination
from .errors import QTuneError
from .io import claim_output_dir, write_json, write_text
from .rl.config import RLConfig

#: The sections, in the order their stages run, and the command config each one holds.
SECTIONS = {"select": SelectConfig, "sft": TrainConfig, "rl": RLConfig, "eval": EvalRunConfig}
#: The options of each section that the pipeline sets itself (from its own fields and the stage before).
SET_BY_PIPELINE = {"select": {"model", "data", "out"}, "sft": {"model", "data", "out", "resume"},
                   "rl": {"model", "out", "resume"}, "eval": {"model", "data", "out"}}
#: Options that a started stage may change: how it reports, not what it computes.
NOT_COMPARED = {"out", "resume", "progress", "report_to", "logging_steps", "save_steps", "save_total_limit",
                "num_proc", "data_cache", "plot", "allow_config_change"}
RECORD = "pipeline.json"


@dataclass
class PipelineOptions(ContaminationConfig):
    """The pipeline's own options (the sections are `PipelineConfig`'s), with the check of the
    training data against eval_data (`ContaminationConfig`)."""

    out: str = option(help="Output folder: one folder per stage, pipeline.json, report.md, report.json.",
                      required=True)
    model: str = option(help="The base model (as qtune train's --model takes it): what select scores and SFT starts "
                             "from (RL's start when there is no sft section).", required=True)
    data: str = option(help="The training data: what select chooses from and SFT trains on (RL's prompts when the "
                            "rl section names no data).", required=True)
    eval_data: str | None = option(None, "Held-out problems evaluated (qtune eval) after every training stage; "
                                         "none: no evaluation.")
    eval_base: bool = option(True, "With eval_data: also evaluate the base model, before any stage.")


@dataclass
class PipelineConfig(PipelineOptions):
    """Options of `qtune pipeline` (`qtune.pipeline.run_pipeline`). Each section is a mapping of the
    options of its command (YAML, or a flag holding a YAML mapping: `--sft '{method: qtuning, lr: 1e-3}'`),
    checked as that command checks them, without the options the pipeline sets (model, data, out,
    resume)."""

    select: dict | None = option(None, "qtune select's options (selector, ratio, ...): the SFT data becomes "
                                       "the selection. Absent: no selection.")
    sft: dict | None = option(None, "qtune train's options (method, r_sample, r_token, epochs, lr, batch_size, "
                                    "lora_r, ...). Absent: no SFT (RL starts from model).")
    rl: dict | None = option(None, "qtune rl's options (rewards, num_generations, max_steps, lr, beta, data, "
                                   "filter_zero_variance, ...); eval_steps > 0 without eval_data uses the "
                                   "pipeline's eval_data. Absent: no RL.")
    eval: dict | None = option(None, "qtune eval's options for every evaluation (max_new_tokens, batch_size, "
                                     "limit, num_fewshot, perplexity, ...).")

    def __post_init__(self) -> None:
        # The sections are mappings, which the shared checks do not convert: the scalars are checked
        # by PipelineOptions, each section by building its command's config.
        scalars = PipelineOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PipelineOptions)})
        for f in dataclasses.fields(PipelineOptions):
            setattr(self, f.name, getattr(scalars, f.name))
        for name in SECTIONS:
            setattr(self, name, _section(name, getattr(self, name)))
        if self.sft is None and self.rl is None:
            raise QTuneError("pipeline: nothing to train; give an sft section, an rl section or both")
        stage_configs(self)  # every stage's options are checked now, before anything runs


def _section(name: str, value) -> dict | None:
    """A section as a mapping: YAML's, or a flag's string parsed as a YAML mapping; its keys must be
    options of the section's command that the pipeline does not set."""
    import yaml

    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise QTuneError(f"pipeline: {name} is not a YAML mapping: {str(exc).splitlines()[0]}") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise QTuneError(f"pipeline: {name} must be a mapping of {name} options; got {value!r}")
    taken = sorted(set(value) & SET_BY_PIPELINE[name])
    if taken:
        raise QTuneError(f"pipeline: {name}: {', '.join(taken)} is set by the pipeline (from its own options and "
                         "the stage before); remove it from the section")
    known = {f.name for f in dataclasses.fields(SECTIONS[name])} - SET_BY_PIPELINE[name]
    unknown = sorted(set(value) - known)
    if unknown:
        raise QTuneError(f"pipeline: {name} has unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    return dict(value)


# --- the stages ----------------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage: its name, folder, the command's config, and the file it writes last."""

    name: str
    folder: Path
    config: typing.Any
    last_file: str

    @property
    def finished(self) -> bool:
        return (self.folder / self.last_file).is_file()


def _build(name: str, cls: type, values: dict):
    """The command config of a stage, its errors prefixed with the stage's name."""
    try:
        return cls(**values)
    except QTuneError as exc:
        raise QTuneError(f"pipeline: {name}: {exc}") from None


def stage_configs(cfg: PipelineConfig) -> list[Stage]:
    """The stages of `cfg` in running order, each with the config its command runs with (training
    stages with resume off; `run_pipeline` turns it on for an interrupted stage)."""
    out = Path(cfg.out).resolve()
    stages: list[Stage] = []
    model, data = cfg.model, cfg.data

    def evaluation(after: str, model_path: str) -> None:
        if cfg.eval_data is not None:
            folder = out / f"eval-{after}"
            values = {**(cfg.eval or {}), "model": model_path, "data": cfg.eval_data, "out": str(folder)}
            stages.append(Stage(f"eval-{after}", folder, _build("eval", EvalRunConfig, values), "metrics.json"))

    if cfg.eval_base:
        evaluation("base", model)
    if cfg.select is not None:
        folder = out / "select"
        config = _build("select", SelectConfig, {**cfg.select, "model": model, "data": data, "out": str(folder)})
        stages.append(Stage("select", folder, config, "summary.json"))
        data = str(folder / "selected.jsonl")
    if cfg.sft is not None:
        folder = out / "sft"
        config = _build("sft", TrainConfig, {**cfg.sft, "model": model, "data": data, "out": str(folder)})
        stages.append(Stage("sft", folder, config, "summary.json"))
        model = str(folder / "model")
        evaluation("sft", model)
    if cfg.rl is not None:
        folder = out / "rl"
        values = {"data": data, **cfg.rl, "model": model, "out": str(folder)}
        if values.get("eval_steps") and values.get("eval_data") is None:
            values["eval_data"] = cfg.eval_data
        stages.append(Stage("rl", folder, _build("rl", RLConfig, values), "summary.json"))
        evaluation("rl", str(folder / "model"))
    return stages


def _options(config, out: Path) -> dict:
    """The compared options of a stage's config, as JSON types; a path inside OUT is written
    relative to it (`<out>/sft/model`), so that OUT may be named relatively or absolutely, or moved."""
    inside = str(out.resolve()) + os.sep
    values = json.loads(json.dumps(dataclasses.asdict(config)))
    return {k: f"<out>{os.sep}{v.removeprefix(inside)}" if isinstance(v, str) and v.startswith(inside) else v
            for k, v in values.items() if k not in NOT_COMPARED}


def check_started_stages(stages: list[Stage], recorded: dict, out: Path) -> None:
    """Refuse a stage that has started (its folder exists) with options other than those recorded."""
    for stage in stages:
        if stage.folder.exists() and stage.name in recorded:
            changes = config_changes(recorded[stage.name], _options(stage.config, out))
            if changes:
                listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                raise QTuneError(f"pipeline: stage {stage.name} was started with other options ({listed}); delete "
                                 f"{stage.folder} and the stages after it, or choose another --out")


def _run_stage(stage: Stage) -> None:
    """Run (or resume) one unfinished stage."""
    if stage.name in ("sft", "rl"):
        from .rl.run import run_rl
        from .train import run_train

        complete, _ = scan(stage.folder)
        if not complete:  # nothing to resume: whatever an interrupted start left is removed
            shutil.rmtree(stage.folder, ignore_errors=True)
        config = dataclasses.replace(stage.config, resume=bool(complete))
        if complete:
            log(f"pipeline: resuming {stage.name} from {complete[-1].name}")
        (run_train if stage.name == "sft" else run_rl)(config)
    elif stage.name == "select":
        from .selection import run_select

        run_select(stage.config)
    else:
        from .workflows import run_eval

        run_eval(stage.config)


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every unfinished stage of `cfg` in order, rewriting the report after each; returns the
    report (see the module doc)."""
    from .processes import launcher_world_size

    if launcher_world_size() > 1:
        # Its select and eval stages run in one process, and one process holds OUT's lock.
        raise QTuneError("qtune pipeline runs in one process; for several, launch its training stages on their "
                         "own (torchrun or accelerate launch with qtune train and qtune rl)")
    out = Path(cfg.out)
    stages = stage_configs(cfg)
    check_training_data(cfg)
    with claim_output_dir(out, "qtune pipeline"):
        record_path = out / RECORD
        recorded = json.loads(record_path.read_text(encoding="utf-8"))["stages"] if record_path.exists() else {}
        check_started_stages(stages, recorded, out)
        write_json(record_path, {"stages": {s.name: _options(s.config, out) for s in stages}})
        for stage in stages:
            if stage.finished:
                log(f"pipeline: {stage.name} finished before, skipped ({stage.folder})")
            else:
                log(f"pipeline: {stage.name} -> {stage.folder}")
                _run_stage(stage)
            report = stage_report(stages)
            write_json(out / "report.json", report)
            write_text(out / "report.md", report_markdown(report) + "\n")
    print(report_markdown(report))
    return report


def check_training_data(cfg: PipelineConfig) -> None:
    """Before any stage: the data that SFT or RL trains on (the pipeline's data, and the rl
    section's own data) must not overlap eval_data beyond --contamination-threshold
    (`qtune.contamination.check_contamination`); nothing to check without eval_data."""
    if cfg.eval_data is None:
        return
    trained = {cfg.data: (cfg.sft or {}).get("format", "auto")}
    if cfg.rl is not None and cfg.rl.get("data"):
        trained.setdefault(cfg.rl["data"], cfg.rl.get("format", "auto"))
    for path, format in trained.items():
        found = check_contamination(path, cfg.eval_data, threshold=cfg.contamination_threshold,
                                    allow=cfg.allow_contamination, command="qtune pipeline", format=format)
        if found.train_ids:
            log(f"pipeline: {path} vs {cfg.eval_data}: {found.summary()}")


# --- the report ----------------------------------------------------------------------------------


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def stage_report(stages: list[Stage]) -> dict:
    """One row per finished stage (`base` for the base model's evaluation): the held-out exact
    match (strict and flexible) of the evaluation after it and that evaluation's seconds, and for a
    stage that trains or selects its wall seconds (select: scoring; SFT: scoring + training, as
    qtune train's summary; RL: its steps plus the zero-variance pre-pass) and tokens (SFT: loss
    tokens, the response tokens that received loss, and input tokens of the trained rows; RL: loss
    tokens, the completion tokens that received the policy loss, and input tokens, prompts and
    completions read)."""
    from .run_log import read_step_log

    rows: dict[str, dict] = {}
    for stage in stages:
        if not stage.finished:
            continue
        if stage.name.startswith("eval-"):
            metrics = _json(stage.folder / "metrics.json")
            rows.setdefault(stage.name.removeprefix("eval-"), {}).update(
                exact_match_strict=metrics["exact_match_strict"], exact_match_flexible=metrics["exact_match_flexible"],
                eval_n=metrics["n"], eval_seconds=metrics["seconds"])
            continue
        summary = _json(stage.folder / "summary.json")
        row = rows.setdefault(stage.name, {})
        if stage.name == "select":
            row.update(seconds=summary["scoring_seconds"], kept=summary["n_records_kept"], of=summary["n_records"])
        elif stage.name == "sft":
            steps = read_step_log(stage.folder / "steps.jsonl")
            row.update(seconds=summary["wall_seconds"], steps=summary["steps"], method=summary["method"],
                       loss_tokens=sum(r["kept_tokens"] for r in steps),
                       input_tokens=sum(r["trained_input_tokens"] for r in steps))
        else:
            row.update(seconds=summary["wall_seconds"], steps=summary["steps"],
                       loss_tokens=summary["completion_tokens"], input_tokens=summary["tokens_seen"],
                       prompts=summary["prompts"], filter_seconds=summary["filter_seconds"],
                       zero_variance_dropped=(summary["zero_variance"] or {}).get("dropped"),
                       reward_first=summary["reward_first"], reward_last=summary["reward_last"])
    order = ["base", *(s.name for s in stages if not s.name.startswith("eval-"))]
    return {"stages": [{"stage": name, **rows[name]} for name in order if name in rows]}


def report_markdown(report: dict) -> str:
    """The report as a Markdown table, one row per finished stage."""
    lines = ["| stage | held-out EM (strict) % after it | seconds | steps | loss tokens | input tokens | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in report["stages"]:
        note = ""
        if row["stage"] == "select":
            note = f"kept {row['kept']} of {row['of']} records"
        elif row["stage"] == "sft":
            note = f"method {row['method']}"
        elif row["stage"] == "rl":
            note = f"reward {row['reward_first']:.3f} -> {row['reward_last']:.3f} on {row['prompts']} prompts"
            if row["zero_variance_dropped"] is not None:
                note += (f" ({row['zero_variance_dropped']} zero-variance prompts dropped by a "
                         f"{row['filter_seconds']:.1f} s pre-pass)")
        cells = [row["stage"],
                 f"{100 * row['exact_match_strict']:.1f}" if "exact_match_strict" in row else "",
                 f"{row['seconds']:.1f}" if "seconds" in row else "",
                 *(f"{row[k]:,}" if k in row else "" for k in ("steps", "loss_tokens", "input_tokens")), note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""`qtune pipeline`: select -> SFT -> RL -> evaluate on a tiny testbed, resumed stage by stage."""

import json

import pytest
import yaml

import qtune.selection
import qtune.train
from qtune.cli import main
from qtune.errors import OptionError, QTuneError
from qtune.pipeline import PipelineConfig, run_pipeline
from qtune.rl.trainer import QTuneGRPOTrainer
from qtune.train import read_step_log
from test_rl import TINY_DATA, testbed  # noqa: F401 (testbed is a fixture)

SECTIONS = dict(
    select={"selector": "random", "ratio": 0.5, "plot": False},
    sft={"method": "qtuning", "r_sample": 0.5, "r_token": 0.5, "max_steps": 2, "batch_size": 8, "lr": 1e-2,
         "progress": False},
    rl={"max_steps": 2, "save_steps": 1, "num_generations": 4, "batch_size": 8, "max_completion_length": 16,
        "lr": 1e-2, "rewards": ["exact_match", "test_rl:text_length"], "progress": False},
    eval={"limit": 4, "max_new_tokens": 8, "perplexity": False},
)


def pipeline_values(testbed, out) -> dict:
    return dict(out=str(out), model=str(testbed.model_dir), data=str(testbed.train_path),
                eval_data=str(testbed.test_path), **SECTIONS)


def test_stages_feed_each_other_resume_after_a_kill_and_report(testbed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pipe"
    save = QTuneGRPOTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        raise KeyboardInterrupt  # killed in the RL stage, right after checkpoint-1

    monkeypatch.setattr(QTuneGRPOTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(PipelineConfig(**pipeline_values(testbed, out)))
    monkeypatch.undo()
    report = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == ["base", "select", "sft"]
    first_step = read_step_log(out / "rl" / "steps.jsonl")
    assert [r["step"] for r in first_step] == [1]

    def must_not_run(cfg):
        pytest.fail(f"a finished stage ran again: {cfg.out}")

    monkeypatch.setattr(qtune.train, "run_train", must_not_run)
    monkeypatch.setattr(qtune.selection, "run_select", must_not_run)
    report = run_pipeline(PipelineConfig(**pipeline_values(testbed, out)))
    assert "resuming rl from checkpoint-1" in capsys.readouterr().err
    steps = read_step_log(out / "rl" / "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2] and steps[0] == first_step[0]

    # Each stage read the one before it.
    selected = (out / "select" / "selected.jsonl").read_text().splitlines()
    assert len(selected) == TINY_DATA.train_size // 2
    sft = json.loads((out / "sft" / "summary.json").read_text())["config"]
    assert sft["data"] == str(out / "select" / "selected.jsonl") and sft["model"] == str(testbed.model_dir)
    rl = json.loads((out / "rl" / "summary.json").read_text())
    assert rl["start"] == str(out / "sft" / "model") and rl["prompts"] == len(selected)
    assert json.loads((out / "eval-rl" / "predictions.jsonl").read_text().splitlines()[0])["sample_id"] == 0

    rows = {row["stage"]: row for row in report["stages"]}
    assert list(rows) == ["base", "select", "sft", "rl"]
    for stage in ("base", "sft", "rl"):
        assert 0 <= rows[stage]["exact_match_strict"] <= 1 and rows[stage]["eval_n"] == 4
    assert rows["select"]["kept"] == len(selected)
    assert rows["sft"]["steps"] == 2 and rows["sft"]["loss_tokens"] > 0 and rows["sft"]["method"] == "qtuning"
    assert rows["rl"]["steps"] == 2 and rows["rl"]["loss_tokens"] == rl["completion_tokens"] > 0
    assert rows["rl"]["seconds"] == pytest.approx(sum(r["seconds"] for r in steps))
    table = (out / "report.md").read_text()
    assert table.startswith("| stage | held-out EM (strict) % after it") and "| rl |" in table


def test_the_command_reads_yaml_and_refuses_changed_options_of_a_started_stage(testbed, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "pipe"
    values = pipeline_values(testbed, out)
    values.update(select=None, eval_base=False, rl={**SECTIONS["rl"], "max_steps": 1})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(values))
    assert main(["pipeline", "--config", str(tmp_path / "p.yaml")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == ["sft", "rl"]
    assert not (out / "select").exists() and not (out / "eval-base").exists()
    capsys.readouterr()
    assert main(["pipeline", "--config", str(tmp_path / "p.yaml"), "--sft", "{method: random, max_steps: 2}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pipeline: stage sft was started with other options (") and "method 'qtuning' -> " \
        "'random'" in err and len(err.splitlines()) == 1
    # OUT named relatively: the same stages, all finished.
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "--config", str(tmp_path / "p.yaml"), "--out", "pipe"]) == 0
    assert capsys.readouterr().err.count("finished before, skipped") == 4
    # A stage that has not started may be added or changed: the base model's evaluation.
    assert main(["pipeline", "--config", str(tmp_path / "p.yaml"), "--eval-base"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [row["stage"] for row in report["stages"]] == ["base", "sft", "rl"]


def test_sections_are_checked_as_their_commands_check_them(testbed, tmp_path):
    values = pipeline_values(testbed, tmp_path / "p")
    with pytest.raises(QTuneError, match="pipeline: sft: lr must be greater than 0; got -1"):
        PipelineConfig(**{**values, "sft": {"lr": -1}})
    with pytest.raises(QTuneError, match="pipeline: rl: model is set by the pipeline"):
        PipelineConfig(**{**values, "rl": {"model": "x"}})
    with pytest.raises(QTuneError, match="pipeline: rl has unknown option\\(s\\) stepz; known: "):
        PipelineConfig(**{**values, "rl": {"stepz": 3}})
    with pytest.raises(QTuneError, match="pipeline: rl: rewards must be"):
        PipelineConfig(**{**values, "rl": {"rewards": ["nope"]}})
    with pytest.raises(QTuneError, match="pipeline: eval must be a mapping"):
        PipelineConfig(**{**values, "eval": "[1, 2]"})
    with pytest.raises(QTuneError, match="nothing to train"):
        PipelineConfig(**{**values, "sft": None, "rl": None})
    with pytest.raises(OptionError, match="eval_base must be true or false"):
        PipelineConfig(**{**values, "eval_base": "no"})
    parsed = PipelineConfig(**{**values, "sft": "{method: random, r_sample: 0.5}"})  # a flag's YAML mapping
    assert parsed.sft == {"method": "random", "r_sample": 0.5}


def test_the_pipeline_refuses_several_processes_before_touching_out(testbed, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(QTuneError, match="qtune pipeline runs in one process"):
        run_pipeline(PipelineConfig(**pipeline_values(testbed, tmp_path / "p")))
    assert not (tmp_path / "p").exists()

"""Experiments as configs: every `qtune bench --config bench/...yaml` the docs name parses, a
testbed preset's calibrated settings are the defaults under `--testbed`, the configs make the same
cells as the commands that produced the documented results, and no script or config in bench/
repeats a preset's settings."""

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from qtune.bench import BenchConfig, add_bench_parser, preset_defaults
from qtune.config import build_config
from qtune.testbed import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").rglob("*.yaml"))


def parse_bench(argv: list[str]) -> BenchConfig:
    """What `qtune bench ARGV` runs with."""
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    ns = parser.parse_args(["bench", *argv])
    return build_config(BenchConfig, ns, ns.config, given_defaults=preset_defaults)


def docs_configs() -> set[str]:
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {m for p in texts
            for m in re.findall(r"--config\s+(bench/[\w/.-]+?\.yaml)", p.read_text(encoding="utf-8"))}


def test_every_config_the_docs_name_exists_and_parses_with_its_presets_settings():
    named = docs_configs()
    assert {"bench/configs/data-starved-grid.yaml", "bench/configs/saturated-grid-a.yaml",
            "bench/configs/saturated-threads2.yaml"} <= named
    assert named <= set(CONFIGS), f"named in the docs but missing: {sorted(named - set(CONFIGS))}"
    for path in CONFIGS:
        cfg = parse_bench(["--config", str(ROOT / path)])
        given = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))
        if path in USER_DATA_CONFIGS:  # its own model and data: no preset applies, every setting is its own
            assert "testbed" not in given and {"model", "data", "eval_data"} <= set(given), path
            continue
        assert "testbed" in given, path  # the preset's settings apply
        for key, value in PRESETS[cfg.testbed].sft_settings.items():
            assert getattr(cfg, key) == given.get(key, value), (path, key)


def test_the_testbed_flag_makes_the_presets_settings_the_defaults(tmp_path):
    starved, saturated = PRESETS["data-starved"].sft_settings, PRESETS["saturated"].sft_settings
    assert starved["epochs"] != saturated["epochs"] and starved["lr"] != saturated["lr"]
    cfg = parse_bench(["--testbed", "data-starved", "--lr", "2e-3"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.max_new_tokens) == (
        starved["epochs"], 2e-3, starved["batch_size"], starved["max_new_tokens"])
    plain = parse_bench([])  # no preset named: the options' own defaults
    defaults = BenchConfig()
    assert (plain.epochs, plain.lr, plain.testbed) == (defaults.epochs, defaults.lr, "saturated")
    config = tmp_path / "run.yaml"
    config.write_text("testbed: data-starved\nbatch_size: 8\n")
    from_yaml = parse_bench(["--config", str(config)])
    assert (from_yaml.epochs, from_yaml.batch_size) == (starved["epochs"], 8)
    flag_wins = parse_bench(["--config", str(config), "--testbed", "saturated"])
    assert (flag_wins.epochs, flag_wins.lr, flag_wins.batch_size) == (saturated["epochs"], saturated["lr"], 8)


# The commands that made the documented results, before they became configs (the README's grid,
# bench/*.sh at 8a3e857): each config must make the same cells with the same settings.
STARVED = "--testbed data-starved --epochs 5 --lr 1e-3 --batch-size 16 --warmup-ratio 0.05 --max-new-tokens 200 " \
          "--eval-batch-size 64"
SATURATED = "--testbed saturated --seeds 0,1,2 --epochs 3 --lr 3e-4 --warmup-ratio 0.05 --max-new-tokens 200 " \
            "--eval-batch-size 64"
GRID_METHODS = ("full,oracle,random,qtuning,token_matched_random,oracle_ratio,anti_oracle,random+perplexity,"
                "longest+random,longest+perplexity,entropy+random,entropy+perplexity,infobatch+random,"
                "infobatch+perplexity,random+rho1,random+token_cleaning")
GRID = f"{SATURATED} --jobs 2 --methods {GRID_METHODS} --reference-model runs/grid-saturated/reference/model"
ZOO = f"--testbed saturated --batch-size 4 --seeds 0,1,2 {SATURATED.removeprefix('--testbed saturated ')} " \
      "--jobs 1 --no-plots"
BELOW = f"{STARVED} --methods qtuning --budgets 0.25x0.7 --jobs 1 --no-plots"
BEFORE = {
    "data-starved-grid": f"{STARVED} --out runs/grid --methods full,random,qtuning "
                         "--budgets 0.125x0.5,0.125x0.7,0.25x0.5,0.25x0.7,0.5x0.5,0.5x0.7 --seeds 0,1,2",
    "data-starved-triage-start": f"{STARVED} --out runs/triage-start --methods qtuning --budgets 0.25x0.7 "
                                 "--triage-start 0.2 --seeds 0,1,2",
    "saturated-grid-a": f"{GRID} --batch-size 4 --budgets 0.25x0.5,0.25x0.7 --out runs/grid-saturated/b4",
    "saturated-grid-b": f"{GRID} --batch-size 8 --budgets 0.125x0.5,0.125x0.7 --out runs/grid-saturated/b8",
    "saturated-grid-c-b4": f"{SATURATED} --jobs 1 --methods oracle_ratio+random --batch-size 4 "
                           "--budgets 0.25x0.5,0.25x0.7 --out runs/grid-saturated/ceiling-b4",
    "saturated-grid-c-b8": f"{SATURATED} --jobs 1 --methods oracle_ratio+random --batch-size 8 "
                           "--budgets 0.125x0.5,0.125x0.7 --out runs/grid-saturated/ceiling-b8",
    "saturated-threads2": f"{SATURATED} --methods random,qtuning --budgets 0.25x0.5 --batch-size 4 --jobs 1 "
                          "--out runs/grid-saturated/threads2",
    "saturated-controls": f"{SATURATED} --methods full,oracle,oracle_ratio,random,anti_oracle --budgets 0.25x1 "
                          "--batch-size 4 --jobs 1 --out runs/saturated-calibration/controls",
    "saturated-static": f"{ZOO} --methods full --allow-contamination",
    **{f"saturated-ablations/{name}": f"{ZOO} --methods qtuning --budgets 0.25x0.5 {switch} "
                                      f"--out runs/grid-saturated/ablations/{name}"
       for name, switch in (("stages-sample", "--stages sample"), ("stages-token", "--stages token"),
                            ("keep-q1", "--keep-q1"), ("prune-q4", "--prune-q4"),
                            ("reversed-tokens", "--reversed-tokens"))},
    **{f"below-bound/{name}": f"{BELOW} {option} --out runs/below-bound/{name}"
       for name, option in (("every-layer", ""), ("layers-2", "--score-layers 2"), ("layers-1", "--score-layers 1"),
                            ("reuse-last-epoch", "--rescore-drift 0.0177"), ("reuse-always", "--rescore-drift 1e6"))},
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_each_config_makes_the_cells_of_the_command_it_replaced(name):
    before = dataclasses.asdict(parse_bench(shlex.split(BEFORE[name])))
    now = dataclasses.asdict(parse_bench(["--config", str(ROOT / "bench" / "configs" / f"{name}.yaml")]))
    assert now == before


# Configs written for measurements not run yet (docs/bench.md says which), as the commands they stand for.
UDS = f"{SATURATED} --jobs 2 --methods full,random,qtuning,token_matched_random,uds+all,uds+random " \
      "--reference-model runs/grid-saturated/reference/model"
PLANNED = {
    "saturated-draws": f"{SATURATED} --jobs 2 --methods full,random,qtuning,token_matched_random,oracle_ratio+random "
                       "--budgets 0.25x0.5 --data-seeds 0,1,2 --out runs/draws-saturated",
    "saturated-draws-uds": f"{SATURATED} --jobs 2 --methods full,random,qtuning,token_matched_random,"
                           "oracle_ratio+random,uds+all,uds+random --budgets 0.25x0.5 --data-seeds 0,1,2 "
                           "--out runs/draws-saturated",
    "saturated-draws-uds-b8": f"{SATURATED} --jobs 2 --methods random,qtuning,token_matched_random,uds+all,uds+random "
                              "--budgets 0.125x0.5 --batch-size 8 --data-seeds 0,1,2 --out runs/draws-saturated-b8",
    "saturated-uds-b4": f"{UDS} --batch-size 4 --budgets 0.25x0.5 --out runs/grid-saturated/b4",
    "saturated-uds-b8": f"{UDS} --batch-size 8 --budgets 0.125x0.5 --out runs/grid-saturated/b8",
    **{f"saturated-objectives/{loss}": f"{SATURATED} --jobs 2 --methods full --loss {loss} --data-seeds 0,1,2 "
                                       f"--no-plots --out runs/draws-objectives/{loss}"
       for loss in ("dft", "asft", "psft", "eaft")},
}


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_each_planned_config_makes_the_cells_of_its_command(name):
    planned = dataclasses.asdict(parse_bench(shlex.split(PLANNED[name])))
    now = dataclasses.asdict(parse_bench(["--config", str(ROOT / "bench" / "configs" / f"{name}.yaml")]))
    assert now == planned


#: A config on user data (its own model, data and eval data), which takes no preset's settings.
USER_DATA_CONFIGS = {"bench/configs/real-smollm2-gsm8k.yaml"}


def test_every_config_is_covered_by_the_comparison_above():
    assert {f"bench/configs/{name}.yaml" for name in {**BEFORE, **PLANNED}} | USER_DATA_CONFIGS == set(CONFIGS)


#: Flags of the preset settings, and the keys of `sft_settings` each one sets (`--batch-size` is the
#: training batch of `qtune train` and the generation batch of `qtune eval`).
PRESET_FLAGS = {"--epochs": ("epochs",), "--lr": ("lr",), "--warmup-ratio": ("warmup_ratio",),
                "--max-new-tokens": ("max_new_tokens",), "--eval-batch-size": ("eval_batch_size",),
                "--batch-size": ("batch_size", "eval_batch_size")}


def repeated_settings(text: str, settings: list[dict]) -> list[str]:
    """The flags of a shell script that set a preset's setting to that preset's value."""
    repeated = []
    for flag, value in re.findall(r"(?:^|\s)(--[a-z][a-z0-9-]*)[ =]([^\s\\]+)", text):
        if flag not in PRESET_FLAGS:
            continue
        try:
            number = float(value)
        except ValueError:
            continue  # a variable, e.g. --lr "$lr"
        if any(number == s[key] for s in settings for key in PRESET_FLAGS[flag]):
            repeated.append(f"{flag} {value}")
    return repeated


def test_no_script_or_config_in_bench_repeats_a_presets_settings():
    presets = [p.sft_settings for p in PRESETS.values()]
    assert repeated_settings("qtune bench --epochs 3 --lr 3e-4 --seeds 0 --less-lr 3e-4 --epochs 1", presets) == [
        "--epochs 3", "--lr 3e-4"]  # the check itself finds them
    scripts = sorted((ROOT / "bench").glob("*.sh"))
    assert len(scripts) >= 5
    for script in scripts:
        assert repeated_settings(script.read_text(encoding="utf-8"), presets) == [], script.name
    for path in sorted(set(CONFIGS) - USER_DATA_CONFIGS):
        given = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))
        own = PRESETS[given["testbed"]].sft_settings
        assert [k for k in own if k in given and float(given[k]) == own[k]] == [], path


def test_the_scripts_train_and_eval_commands_take_the_presets_settings_as_they_were_written_before():
    """bench/preset_options.py gives `qtune train`, `qtune eval` and bench/saturated_a1.py the flags
    the scripts spelled out before (the reference model of the saturated grid, the probe of
    below_bound.sh, the one-epoch SFT and the base-model evaluation of testbed_calibration.sh)."""
    import importlib.util

    from qtune.cli import build_parser
    from qtune.config import EvalRunConfig, TrainConfig

    spec = importlib.util.spec_from_file_location("preset_options", ROOT / "bench" / "preset_options.py")
    preset_options = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preset_options)

    def run(command: str, cls: type, flags: str):
        ns = build_parser().parse_args([command, "--model", "m", "--data", "d", "--out", "o", *shlex.split(flags)])
        return build_config(cls, ns)

    def flags(preset: str, command: str) -> str:
        return preset_options.preset_flags(preset, command)

    assert run("train", TrainConfig, f"--method full {flags('saturated', 'train')}") == run(
        "train", TrainConfig, "--method full --batch-size 4 --epochs 3 --lr 3e-4 --warmup-ratio 0.05")
    assert run("train", TrainConfig, f"{flags('data-starved', 'train')} --rescore-drift 1e-12") == run(
        "train", TrainConfig, "--epochs 5 --lr 1e-3 --batch-size 16 --warmup-ratio 0.05 --rescore-drift 1e-12")
    assert run("train", TrainConfig, f"{flags('data-starved', 'train')} --epochs 1") == run(
        "train", TrainConfig, "--epochs 1 --lr 1e-3 --batch-size 16 --warmup-ratio 0.05")
    assert run("eval", EvalRunConfig, flags("data-starved", "eval")) == run(
        "eval", EvalRunConfig, "--max-new-tokens 200 --batch-size 64")
    assert flags("saturated", "a1") == "--epochs 3 --lr 0.0003 --batch-size 4"  # saturated_a1.py's int --epochs

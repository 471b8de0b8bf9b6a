"""Whole-dataset passes on several processes (`qtune.processes`): the round-robin share of the
batches by hand; `qtune score`, `qtune select` and `qtune audit` in 2 CPU processes (torchrun,
gloo) write what one process writes; more processes than batches; an unusable --out stops every
process."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from test_train import SRC, tiny_run_inputs  # noqa: F401 (a fixture)

from qtune.processes import Processes, run_batches

WORKER = """
import json, sys
from qtune.audit.run import run_audit
from qtune.config import AuditConfig, ScoreConfig, SelectConfig
from qtune.selection import run_select
from qtune.workflows import run_score

kind, values = sys.argv[1], json.loads(sys.argv[2])
run, config = {"score": (run_score, ScoreConfig), "select": (run_select, SelectConfig),
               "audit": (run_audit, AuditConfig)}[kind]
run(config(**values))
"""
TIMEOUT = 300  # seconds; a process left out of a collective would hang the others until then


def launch(tmp_path, kind: str, values: dict, processes: int, *, check: bool = True):
    """`qtune score` or `qtune select` with `values` in `processes` processes (torchrun when more
    than one)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "QTUNE_CACHE": str(tmp_path / "cache")}  # the judge's answers too: each run generates its own
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), str(script), kind,
               json.dumps({"plot": False, **values})]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_batches_go_round_robin_and_every_process_gets_all_of_them():
    """5 batches over 2 processes: process 0 runs batches 0, 2, 4, process 1 batches 1, 3 and sits
    out round 2; with one process the helper runs every batch in order."""
    batches = [[0, 1], [2], [3, 4, 5], [6], [7]]
    shares = {rank: [Processes(rank, 2).batch_of_round(r, 5) for r in range(Processes(rank, 2).rounds(5))]
              for rank in (0, 1)}
    assert shares == {0: [0, 2, 4], 1: [1, 3, None]}
    assert Processes(2, 3).batch_of_round(0, 2) is None  # more processes than batches

    seen = []
    rows = run_batches(lambda indices: seen.append(indices) or {i: i * i for i in indices}, batches, Processes())
    assert seen == batches and rows == {i: i * i for i in range(8)}


def read(folder):
    return pq.read_table(folder / "scores.parquet").to_pydict()


#: The selectors run in 2 processes against 1: one ranking by the scoring pass, one with a second
#: shared pass (the answers alone), one whose own forward passes are shared (with a target set),
#: two that share a LoRA warm-up's steps and per-sample gradients (LESS over 2 checkpoints with a
#: target set, GrADS), and one that runs on the main process alone under a launcher (THTB's judge:
#: the tiny model judges itself).
SELECTORS = {"perplexity": {}, "ifd": {}, "rds": {"scores": False, "target_data": "target.jsonl"},
             "less": {"scores": False, "target_data": "target.jsonl", "less_epochs": 2, "less_dim": 64,
                      "less_fraction": 0.5},
             "grads": {"scores": False},
             "thtb": {"scores": False, "judge_model": "MODEL", "clusters": 4}}


@pytest.fixture(scope="module")
def one_process(tiny_run_inputs, tmp_path_factory):  # noqa: F811
    """`qtune score` and `qtune select` with each of SELECTORS, of the 48 records, in one process."""
    model, data = tiny_run_inputs
    root = tmp_path_factory.mktemp("one-process")
    common = {"model": str(model), "data": str(data), "batch_size": 4}
    (root / "target.jsonl").write_text("".join(open(data).readlines()[-6:]))
    launch(root, "score", {**common, "out": str(root / "score")}, 1)
    for name in SELECTORS:
        launch(root, "select", select_values(common, root, root / name, name), 1)
    return root, common


def select_values(common: dict, root, out, selector: str) -> dict:
    """qtune select's options for `selector` (a target file named in SELECTORS is under `root`)."""
    extra = {k: str(root / v) if k == "target_data" else common["model"] if v == "MODEL" else v
             for k, v in SELECTORS[selector].items()}
    return {**common, "out": str(out), "selector": selector, "ratio": 0.25, **extra}


def test_two_processes_score_what_one_process_scores(one_process, tmp_path):
    root, common = one_process
    done = launch(tmp_path, "score", {**common, "out": str(tmp_path / "score")}, 2)
    one, two = read(root / "score"), read(tmp_path / "score")
    assert two["sample_id"] == one["sample_id"] == list(range(48))
    assert two["ppl"] == pytest.approx(one["ppl"], rel=1e-5) and two["entropy"] == pytest.approx(one["entropy"], rel=1e-5)
    assert two["quadrant"] == one["quadrant"] and two["kept"] == one["kept"]
    summary_one = json.loads((root / "score" / "summary.json").read_text())
    summary_two = json.loads((tmp_path / "score" / "summary.json").read_text())
    assert summary_two["counts"] == summary_one["counts"] and summary_two["tokens"] == summary_one["tokens"]
    assert "cpu x 2" in summary_two["machine"]
    assert done.stdout.count("quadrant") == (root / "score" / "summary.md").read_text().count("quadrant")  # main prints once


@pytest.mark.parametrize("selector", sorted(SELECTORS))
def test_two_processes_select_what_one_process_selects(one_process, tmp_path, selector):
    root, common = one_process
    launch(tmp_path, "select", select_values(common, root, tmp_path / selector, selector), 2)
    one, two = root / selector, tmp_path / selector
    assert (two / "selected.jsonl").read_text() == (one / "selected.jsonl").read_text()
    assert read(two)["kept"] == read(one)["kept"] and sum(read(one)["kept"]) == 12
    assert read(two)["score"] == pytest.approx(read(one)["score"], rel=1e-5, abs=1e-6)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_more_processes_than_batches(one_process, tmp_path):
    """3 processes, 4 records in one batch of 8: two processes run nothing and still finish."""
    root, common = one_process
    small = tmp_path / "four.jsonl"
    small.write_text("".join(open(common["data"]).readlines()[:4]))
    values = {**common, "data": str(small), "batch_size": 8}
    launch(tmp_path, "score", {**values, "out": str(tmp_path / "one")}, 1)
    launch(tmp_path, "score", {**values, "out": str(tmp_path / "three")}, 3)
    assert read(tmp_path / "three")["ppl"] == pytest.approx(read(tmp_path / "one")["ppl"], rel=1e-5)
    assert read(tmp_path / "three")["ppl"] == pytest.approx(read(root / "score")["ppl"][:4], rel=1e-5)


def test_an_unusable_out_stops_every_process(one_process, tmp_path):
    _, common = one_process
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    done = launch(tmp_path, "score", {**common, "out": str(taken)}, 2, check=False)
    assert done.returncode != 0
    assert done.stderr.count("exists and is not a folder") >= 2  # the main process and the other one


def test_two_processes_audit_what_one_process_audits(one_process, tmp_path):
    """The audit's scoring pass shared out, the rules and selectors decided on the gathered scores,
    rds's own passes shared: audit.json equal but for the machine and the seconds."""
    root, common = one_process
    values = {**common, "sample": 40, "plant": 0.5, "batch_size": 8, "progress": False,
              "selectors": "random,perplexity,ifd,rds", "target_data": str(root / "target.jsonl")}
    launch(tmp_path, "audit", {**values, "out": str(tmp_path / "one")}, 1)
    launch(tmp_path, "audit", {**values, "out": str(tmp_path / "two")}, 2)
    one, two = (json.loads((tmp_path / name / "audit.json").read_text()) for name in ("one", "two"))
    for result in (one, two):
        for key in ("machine", "scoring_seconds"):
            result["settings"].pop(key)
    assert two == one and "selector:rds" in one["methods"]
    assert (tmp_path / "two" / "planted.jsonl").read_text() == (tmp_path / "one" / "planted.jsonl").read_text()


@pytest.mark.parametrize("env, asked", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
])
def test_a_launch_that_asks_for_sharded_parameters_is_refused(one_process, tmp_path, monkeypatch, env, asked):
    """accelerate launch with an FSDP or ZeRO-3 config: the passes would hold the whole model on
    every process, so qtune score, select and audit stop with one line before anything loads
    (nothing is written); a ZeRO-2 config, which shards nothing the passes hold, runs."""
    from qtune.audit.run import run_audit
    from qtune.config import AuditConfig, ScoreConfig, SelectConfig
    from qtune.errors import QTuneError
    from qtune.selection import run_select
    from qtune.workflows import run_score

    _, common = one_process
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for run, config, command in ((run_score, ScoreConfig, "qtune score"), (run_select, SelectConfig, "qtune select"),
                                 (run_audit, AuditConfig, "qtune audit")):
        with pytest.raises(QTuneError, match=f"{command} runs its passes data-parallel.*asks for {asked}"):
            run(config(**common, out=str(tmp_path / command), plot=False))
        assert not (tmp_path / command).exists()
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    run_score(ScoreConfig(**common, out=str(tmp_path / "zero2"), plot=False))
    assert read(tmp_path / "zero2")["ppl"] == pytest.approx(read(one_process[0] / "score")["ppl"], rel=1e-5)

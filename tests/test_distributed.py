"""Several processes: 2 CPU processes (torchrun, gloo) train what 1 process trains on the same
global batches; local triage decides per process; a process with nothing to train still joins
every gradient reduction (a hang fails the test through its timeout)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import SRC, tiny_run_inputs, train_config  # noqa: F401 (tiny_run_inputs is a fixture)

from qtune import checkpoints
from qtune.pruning import keep_count
from qtune.train import read_step_log, run_train

WORKER = """
import json, sys
from qtune.config import TrainConfig
from qtune.train import run_train

run_train(TrainConfig(**json.loads(sys.argv[1])))
"""

TIMEOUT = 300  # seconds; a process that skipped a backward would hang the others until then


def launch(tmp_path, cfg, processes: int):
    """Run `cfg` in `processes` processes (torchrun when more than one); fail on error or timeout."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    values = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), str(script), json.dumps(values)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]


def weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


# The same global batches: 2 processes x 1 micro-batch of 8 against 1 process x 2 micro-batches of
# 8. QTuneTrainer's sampler groups by length over the global batch (8 x 1 x 2 = 8 x 2 x 1) with the
# Trainer's seed, so both runs draw the same sample order; accelerate hands the batches of that
# order to the processes in turn (process 0 gets batch 0, process 1 batch 1), and the gathered
# global batch is in rank order, the order of the single process's micro-batches.
COMMON = dict(method="qtuning", batch_size=8, max_steps=3, lr=1e-3, r_sample=0.25, r_token=0.7, seed=3,
              log_token_masks=True)


@pytest.fixture(scope="module")
def single_run(tiny_run_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    launch(out.parent, train_config(tiny_run_inputs, out, grad_accum=2, **COMMON), 1)
    return out


def test_two_processes_train_what_one_process_trains(tiny_run_inputs, single_run, tmp_path):
    out = tmp_path / "run"
    launch(tmp_path, train_config(tiny_run_inputs, out, grad_accum=1, **COMMON), 2)
    one, two = read_step_log(single_run / "steps.jsonl"), read_step_log(out / "steps.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["sample_ids"] == a["sample_ids"] and b["kept_ids"] == a["kept_ids"]
        assert b["kept"] == a["kept"] == 4 and b["kept_tokens"] == a["kept_tokens"]
        # Each process's kept rows' token masks, gathered: the single process's, sample by sample.
        assert b["kept_token_masks"] == a["kept_token_masks"]
        assert sorted(map(int, b["kept_token_masks"])) == sorted(b["kept_ids"])
        assert sum(m.count("1") for m in b["kept_token_masks"].values()) == b["kept_tokens"]
        # Equal up to float reduction order: the rows are padded to other widths and the gradient
        # is averaged over processes instead of summed in one.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    w1, w2 = weights(single_run), weights(out)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
    # Written once, by the main process (the Trainer saves a checkpoint at the last step).
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-3", "model", "run_config.json", "steps.jsonl", "summary.json"]


def test_local_triage_decides_per_process(tiny_run_inputs, single_run, tmp_path):
    out = tmp_path / "run"
    launch(tmp_path, train_config(tiny_run_inputs, out, grad_accum=1, triage_scope="local", **COMMON), 2)
    rows, global_rows = read_step_log(out / "steps.jsonl"), read_step_log(single_run / "steps.jsonl")
    share = keep_count(COMMON["r_sample"], COMMON["batch_size"])
    for r in rows:
        # Records are in rank order: process 0's samples and kept rows come first.
        own = [r["sample_ids"][:8], r["sample_ids"][8:]]
        kept = [r["kept_ids"][:share], r["kept_ids"][share:]]
        assert r["kept"] == 2 * share and all(set(k) <= set(s) for k, s in zip(kept, own))
    assert [r["sample_ids"] for r in rows] == [r["sample_ids"] for r in global_rows]
    assert [r["kept_ids"] for r in rows] != [r["kept_ids"] for r in global_rows]


def test_a_process_with_nothing_to_train_still_completes(tiny_run_inputs, tmp_path):
    """r_sample 0.1 of 2 x 4 samples keeps one sample per step: one process keeps nothing."""
    out = tmp_path / "run"
    cfg = train_config(tiny_run_inputs, out, method="qtuning", batch_size=4, max_steps=3, r_sample=0.1,
                       save_steps=2)
    launch(tmp_path, cfg, 2)
    rows = read_step_log(out / "steps.jsonl")
    assert [r["kept"] for r in rows] == [1, 1, 1]
    assert all(len(r["sample_ids"]) == 8 for r in rows)
    # Checkpoints staged and sealed by the main process, with the files of both (RNG states).
    saved = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in saved] == ["checkpoint-2", "checkpoint-3"]
    for folder in saved:
        assert checkpoints.is_complete(folder) and (folder / "qtune-method-state.json").exists()
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in folder.iterdir()}
    assert all(torch.isfinite(t).all() for t in weights(out).values())

    # Both processes resume from the main process's last checkpoint.
    launch(tmp_path, dataclasses.replace(cfg, max_steps=4, resume=True, allow_config_change="max_steps"), 2)
    resumed = read_step_log(out / "steps.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[:3] == rows


def test_training_arguments_pass_through(tiny_run_inputs, tmp_path):
    """Gradient checkpointing changes memory, not the arithmetic: the same losses."""
    from qtune.train import _training_arguments

    cfg = train_config(tiny_run_inputs, tmp_path / "ckpt", method="qtuning", max_steps=2,
                       gradient_checkpointing=True, ddp_find_unused_parameters=False)
    args = _training_arguments(cfg, tmp_path / "ckpt", torch.device("cpu"), False)
    assert args.ddp_find_unused_parameters is False and not args.fsdp and args.deepspeed is None
    assert getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", None)) is True
    run_train(cfg)
    run_train(train_config(tiny_run_inputs, tmp_path / "plain", method="qtuning", max_steps=2))
    losses = [[r["loss"] for r in read_step_log(tmp_path / name / "steps.jsonl")] for name in ("ckpt", "plain")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)

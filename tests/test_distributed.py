"""Several processes: 2 CPU processes (torchrun, gloo) train what 1 process trains on the same
global batches; local triage decides per process; a process with nothing to train still joins
every gradient reduction (a hang fails the test through its timeout); `qtune rl` (TRL's
GRPOTrainer) runs, filters, evaluates and resumes in 2 processes."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_rl import rl_config, testbed  # noqa: F401 (testbed is a fixture)
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

# qtune rl, with the held-out verdicts replaced by one that the test can count (the tiny model
# answers nothing right): a record is "right" when its sample_id is even.
RL_WORKER = """
import json, sys
import qtune.rl.trainer
from qtune.rl import RLConfig, run_rl

def even_answers(model, tokenizer, records, config, progress):
    return {}, [{"correct_strict": r.sample_id % 2 == 0} for r in records]

qtune.rl.trainer.evaluate_exact_match = even_answers
run_rl(RLConfig(**json.loads(sys.argv[1])))
"""
TESTS = os.path.dirname(__file__)

TIMEOUT = 300  # seconds; a process that skipped a backward would hang the others until then


def launch(tmp_path, cfg, processes: int, worker: str = WORKER):
    """Run `cfg` in `processes` processes (torchrun when more than one); fail on error or timeout."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    values = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    # The tests folder too: the RL tests name their rewards by import path (test_rl:...).
    path = os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), str(script), json.dumps(values)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


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


# Registered before the run, so that it runs after qtune's own exit handler (atexit runs in reverse).
EXIT_WORKER = """
import atexit, os
import torch.distributed as dist
atexit.register(lambda: print(f"rank {os.environ['RANK']}: process group at exit {dist.is_initialized()}"))
""" + WORKER


def test_the_process_group_ends_before_the_interpreter_does(tiny_run_inputs, tmp_path):
    """Left to the interpreter's teardown, gloo's threads can abort a finished process (SIGABRT)."""
    done = launch(tmp_path, train_config(tiny_run_inputs, tmp_path / "run", method="qtuning", batch_size=4,
                                         max_steps=1), 2, EXIT_WORKER)
    assert sorted(line for line in done.stdout.splitlines() if "at exit" in line) == [
        "rank 0: process group at exit False", "rank 1: process group at exit False"]


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


def test_rl_in_two_processes_filters_evaluates_and_resumes(testbed, tmp_path):
    """Each process's prompts are filtered by the main process's pre-pass verdict, the held-out
    records are split over the processes and every verdict gathered, the step log and checkpoints
    are written once, and both processes resume from the main process's checkpoint."""
    out = tmp_path / "rl"
    cfg = rl_config(testbed, out, max_steps=2, save_steps=1, filter_zero_variance=True,
                    rewards=("test_rl:even_ids_constant",), eval_data=str(testbed.test_path), eval_limit=7)
    launch(tmp_path, cfg, 2, RL_WORKER)

    # The pre-pass dropped every even-numbered prompt (its group earns 1.0 throughout); had a
    # process trained on its own unfiltered prompts, the global batch would hold groups without spread.
    report = json.loads((out / "zero_variance.json").read_text())
    assert report["dropped"] == 20 and report["kept"] == 20
    rows = read_step_log(out / "steps.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # Held-out records 0..6 in shares 0, 2, 4, 6 (all "right") and 1, 3, 5 (all "wrong"): 4 of 7
    # only when both shares are counted.
    assert rows[-1]["heldout_exact_match"] == pytest.approx(4 / 7)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 20 and summary["machine"].endswith(f" x 2, torch {torch.__version__}, 1 cpu threads")
    for folder in (out / "checkpoint-1", out / "checkpoint-2"):
        assert checkpoints.is_complete(folder)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in folder.iterdir()}
    start, end = load_file(str(testbed.model_dir / "model.safetensors")), weights(out)
    assert any(not torch.equal(start[k], end[k]) for k in start)

    launch(tmp_path, dataclasses.replace(cfg, max_steps=3, resume=True, allow_config_change="max_steps"), 2,
           RL_WORKER)
    resumed = read_step_log(out / "steps.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3] and resumed[:2] == rows
    for row in resumed:
        # 2 processes x 8 completions: 4 prompts x 4 completions a step, counted over both processes.
        assert row["completion_tokens"] == 16 * row["completions/mean_length"]
        # (With process 1 on its unfiltered prompts, step 3 meets two groups without spread.)
        assert row["zero_variance_groups"] == 0 and row["rewards/even_ids_constant/std"] > 0
    assert json.loads((out / "zero_variance.json").read_text()) == report  # read back, not sampled again


def test_rl_from_a_lora_start_in_two_processes(testbed, tmp_path):
    """A LoRA SFT output with a KL term (a frozen copy of the adapter as the reference) under DDP:
    the trained adapter is saved, without the reference copy."""
    from qtune.config import TrainConfig

    sft = tmp_path / "sft"
    run_train(TrainConfig(model=str(testbed.model_dir), data=str(testbed.train_path), out=str(sft), method="full",
                          lora_r=4, max_steps=1, batch_size=4, lr=1e-2, progress=False))
    out = tmp_path / "rl"
    launch(tmp_path, rl_config(testbed, out, model=str(sft), beta=0.1, rewards=("test_rl:text_length",)), 2, RL_WORKER)
    start = load_file(str(sft / "model" / "adapter_model.safetensors"))
    end = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert start.keys() == end.keys() and all(not torch.equal(start[k], end[k]) for k in start)
    assert all("kl" in r for r in read_step_log(out / "steps.jsonl"))


def test_two_processes_share_the_token_cleaning_pass_and_fix_the_masks_of_one(tiny_run_inputs, tmp_path):
    """Token Cleaning's one-time pass over the training set: each process scores every
    world-size-th sample, the influences are gathered, and the masks saved equal one process's.
    The reference is the tiny model with other random weights, so the influences differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.trainer import TOKEN_MASKS, read_token_masks

    model_dir, _ = tiny_run_inputs
    reference = tmp_path / "reference"
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    type(model)(model.config).save_pretrained(reference)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(reference)
    options = dict(method="random+token_cleaning", r_sample=0.5, r_token=0.5, reference_model=str(reference),
                   batch_size=8, max_steps=1, seed=3)
    launch(tmp_path, train_config(tiny_run_inputs, tmp_path / "one", grad_accum=2, **options), 1)
    launch(tmp_path, train_config(tiny_run_inputs, tmp_path / "two", **options), 2)
    one, two = (read_token_masks(tmp_path / name / TOKEN_MASKS) for name in ("one", "two"))
    assert two.sample_id.tolist() == one.sample_id.tolist() and two.offsets.tolist() == one.offsets.tolist()
    assert torch.equal(two.keep, one.keep) and 0 < int(one.keep.sum()) < one.keep.numel()

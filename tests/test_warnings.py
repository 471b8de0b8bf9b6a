"""A default `qtune train` on the testbed, on one process and on two (torchrun, gloo), prints no
warning: neither DDP's find_unused_parameters notice (qtune turns the search off: every trainable
parameter gets a gradient at every step) nor the tokenizer's "longer than the specified maximum"
(qtune caps --max-length at the tokenizer's model_max_length, 512 for the testbed, and says so once)."""

import json
import os
import re
import subprocess
import sys

import pytest
from test_train import SRC

from qtune.testbed import build_testbed

# What a warning looks like on stderr: Python's warnings ("UserWarning: ..."), transformers' and
# torch's loggers, the DDP reducer's C++ notice ("[W ...] Warning: ..."), the tokenizer's notice.
WARNING = re.compile(r"warn|longer than the specified maximum", re.IGNORECASE)


def run_train(tmp_path, processes: int) -> subprocess.CompletedProcess:
    """One step of a default `qtune train` on 31 testbed records and one of over 512 tokens."""
    paths = build_testbed()
    data = tmp_path / "train.jsonl"
    lines = paths.train_path.read_text(encoding="utf-8").splitlines()[:31]
    long = json.loads(lines[0])
    long["answer"] = " ".join([long["answer"]] * 20)
    data.write_text("\n".join([*lines, json.dumps(long)]) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "qtune.cli", "train", "--model", str(paths.model_dir), "--data",
               str(data), "--out", str(tmp_path / "out"), "--max-steps", "1", "--no-data-cache"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_default_run_prints_no_warning(tmp_path, processes):
    done = run_train(tmp_path, processes)
    assert done.returncode == 0, done.stderr[-4000:]
    warnings = [line for line in done.stderr.splitlines() if WARNING.search(line)]
    assert not warnings, "\n".join(warnings)
    # The cap is said once, by the main process only, and the long record was cut there.
    assert done.stderr.count("samples are cut at 512 tokens") == 1
    assert "1 truncated to 512 tokens" in done.stderr


def test_the_warning_pattern_catches_the_notices_it_is_for():
    ddp = ("[rank0]:[W1207 08:54:56.296890415 reducer.cpp:1529] Warning: find_unused_parameters=True was "
           "specified in DDP constructor, but did not find any unused parameters in the forward pass.")
    tokenizer = ("Token indices sequence length is longer than the specified maximum sequence length for this "
                 "model (600 > 512). Running this sequence through the model will result in indexing errors")
    python = "/x/training_args.py:1541: FutureWarning: `gradient_checkpointing` is deprecated"
    assert all(WARNING.search(line) for line in (ddp, tokenizer, python))
    assert not WARNING.search("training model with method qtuning on 32 samples (cpu, fp32)")

"""The examples run as their users run them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plain_loop_trains_the_tiny_model_with_pruning(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for a in range(2, 26):
            f.write(json.dumps({"question": f"Tom has {a} apples and buys {a + 3}. How many?",
                                "answer": f"{a} + {a + 3} = {2 * a + 3}. #### {2 * a + 3}"}) + "\n")
    out = tmp_path / "model"
    run = subprocess.run([sys.executable, str(EXAMPLES / "plain_loop.py"), str(tiny_model_dir), str(data),
                          "--steps", "3", "--batch-size", "8", "--r-sample", "0.5", "--r-token", "0.5",
                          "--lr", "1e-3", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    steps = re.findall(r"step \d+: loss ([\d.]+), kept (\d+)/8 samples, (\d+)/(\d+) response tokens", run.stdout)
    assert len(steps) == 3, run.stdout
    assert all(kept == "4" and int(tokens) < int(response) for _, kept, tokens, response in steps)
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

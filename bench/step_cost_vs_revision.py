"""Benchmark: the training step's cost of this checkout against another revision of qtune.

Both revisions train the same testbed run (`qtune train`, same data, seed and options) in fresh
processes, alternating (old, new, old, new, ...), so that both see the same machine load; the
ratio of the median scoring + training seconds (from each run's summary.json) is printed. The
other revision is checked out with `git worktree` into a temporary folder and imported from its
`src/` with this environment's packages.

    python bench/step_cost_vs_revision.py --rev 127c6d4                  # Q-Tuning, 25% x 70%
    python bench/step_cost_vs_revision.py --rev 127c6d4 --method full --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_seconds(src: Path, args, model: Path, data: Path, out: Path) -> dict:
    """One `qtune train` of the revision whose package lies in `src`; its summary's timings."""
    command = [sys.executable, "-m", "qtune.cli", "train", "--model", str(model), "--data", str(data),
               "--out", str(out), "--method", args.method, "--r-sample", str(args.r_sample),
               "--r-token", str(args.r_token), "--max-steps", str(args.steps), "--batch-size", "16",
               "--lr", "1e-3", "--save-steps", "100000", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"scoring": summary["scoring_seconds"], "training": summary["training_seconds"],
            "wall": summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="The revision to compare with (a commit or branch).")
    parser.add_argument("--method", default="qtuning")
    parser.add_argument("--r-sample", type=float, default=0.25)
    parser.add_argument("--r-token", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=60, help="Optimizer steps per run (batch 16).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per revision, alternated.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from qtune.testbed import build_testbed

    paths = build_testbed(preset="data-starved")  # the preset of the step-cost figures in docs/performance.md
    with tempfile.TemporaryDirectory(prefix="qtune-step-cost-") as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.rev],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            runs = {"old": [], "new": []}
            for i in range(args.repeats):
                for name, src in (("old", old_tree / "src"), ("new", ROOT / "src")):
                    runs[name].append(train_seconds(src, args, paths.model_dir, paths.train_path, tmp / f"{name}-{i}"))
                    print(f"run {i + 1}/{args.repeats} {name}: {runs[name][-1]['wall']:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=True)
    median = {name: {k: statistics.median(r[k] for r in rows) for k in ("scoring", "training", "wall")}
              for name, rows in runs.items()}
    budget = "" if args.method == "full" else f" {args.r_sample}x{args.r_token}"
    print(f"\n{args.method}{budget}, {args.steps} steps of 16, {args.repeats} runs each, "
          f"{platform.machine()} {os.cpu_count()} cpus, {args.threads} threads")
    print("| revision | scoring s | training s | wall s |\n|---|---:|---:|---:|")
    for name, label in (("old", args.rev), ("new", "this checkout")):
        m = median[name]
        print(f"| {label} | {m['scoring']:.1f} | {m['training']:.1f} | {m['wall']:.1f} |")
    print(f"\nwall time, this checkout / {args.rev}: {median['new']['wall'] / median['old']['wall']:.3f}")


if __name__ == "__main__":
    main()

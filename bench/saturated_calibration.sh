#!/usr/bin/env bash
# Measures the saturated preset's calibration criteria A0-A4 (docs/testbed.md, "The saturated
# preset") with the commands the docs quote. The SFT settings, the preset's own
# (PRESETS["saturated"].sft_settings), were fixed before any method ran on the preset; each
# criterion is judged on these runs only.
# Usage: bash bench/saturated_calibration.sh [OUT]   (default OUT: runs/saturated-calibration)
# One job at a time at one torch thread (about 1.5 hours on this CPU: 15 qtune bench cells, 6 + 3
# plain-loop runs); every step resumes or is skipped once its output exists.
set -euo pipefail
out=${1:-runs/saturated-calibration}
mkdir -p "$out"
export OMP_NUM_THREADS=1
sft=$(python bench/preset_options.py saturated a1)  # the plain loop's epochs, lr and batch size

# A0: the base model (arithmetic, textbook layout, chat format, build time).
[ -e "$out/a0.json" ] || python -m qtune.testbed.probe --out "$out/a0.json"
# A2-A4: full data, the oracle (every clean record), and at 25% of each batch's samples (all
# tokens): the oracle (clean first), random and the anti-oracle (defective first).
qtune bench --config bench/configs/saturated-controls.yaml --out "$out/controls"
# A1 (the defect-free version of the training set: full data vs a random 25%, dev after every
# epoch), then A2's early-stopping baseline (all records, test at the epoch of the best dev score).
[ -e "$out/a1.json" ] || python bench/saturated_a1.py --records defect-free --seeds 0 1 2 $sft --out "$out/a1.json"
[ -e "$out/a2_early.json" ] || python bench/saturated_a1.py --records all --runs full --seeds 0 1 2 $sft --out "$out/a2_early.json"

#!/usr/bin/env bash
# The grid of issues 9 and 12 on the default (saturated) testbed preset, as planned in
# docs/bench.md ("The saturated grid"), plan written before any of its cells ran. Each part is one
# config in bench/configs/ (the preset's own settings, PRESETS["saturated"].sft_settings, are the
# defaults under its `testbed: saturated`); this script builds the reference model they need first.
# Usage: bash bench/saturated_grid.sh [A|B|C|all] [JOBS]   (default: all = A and B; JOBS: the configs'
#   own, 2 for A and B, 1 for C)
#   A: 25% of each step's samples at the preset's batch size 4 (0.25x0.5, 0.25x0.7)
#   B: 12.5% at batch 8 (at batch 4, r_sample 0.125 keeps max(1, floor(0.5)) = 1 sample: 25%)
#   C: the ceiling at the token budget too (oracle_ratio+random; oracle_ratio in A and B trains
#      its samples whole), at both parts' budgets, added after A and B, one cell at a time
# Every part resumes: a finished cell is skipped (docs/bench.md, "Resuming").
set -euo pipefail
part=${1:-all}
jobs=${2:+--jobs $2}
out=runs/grid-saturated
T=$(python -c "from qtune.testbed import build_testbed; print(build_testbed().root)")
# Rho-1 and Token Cleaning compare with a reference model: the base model fine-tuned on the dev
# split (300 records, no question shared with train or test), full data, the preset's settings.
if [ "$part" != C ] && [ ! -e "$out/reference/model/config.json" ]; then
    OMP_NUM_THREADS=1 qtune train --model "$T/model" --data "$T/dev.jsonl" --method full \
        $(python bench/preset_options.py saturated train) --out "$out/reference"
fi
if [ "$part" = A ] || [ "$part" = all ]; then
    qtune bench --config bench/configs/saturated-grid-a.yaml $jobs
fi
if [ "$part" = B ] || [ "$part" = all ]; then
    qtune bench --config bench/configs/saturated-grid-b.yaml $jobs
fi
if [ "$part" = C ]; then
    qtune bench --config bench/configs/saturated-grid-c-b4.yaml $jobs
    qtune bench --config bench/configs/saturated-grid-c-b8.yaml $jobs
fi

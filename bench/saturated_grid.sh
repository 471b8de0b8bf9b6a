#!/usr/bin/env bash
# The grid of issues 9 and 12 on the default (saturated) testbed preset, as planned in
# docs/bench.md ("The saturated grid"), plan written before any of its cells ran.
# Usage: bash bench/saturated_grid.sh [A|B|C|all] [JOBS]   (default: all = A and B, 2 jobs)
#   A: 25% of each step's samples at the preset's batch size 4 (0.25x0.5, 0.25x0.7)
#   B: 12.5% at batch 8 (at batch 4, r_sample 0.125 keeps max(1, floor(0.5)) = 1 sample: 25%)
#   C: the ceiling at the token budget too (oracle_ratio+random; oracle_ratio in A and B trains
#      its samples whole), at both parts' budgets, added after A and B
# Every part resumes: a finished cell is skipped (docs/bench.md, "Resuming").
set -euo pipefail
part=${1:-all}
jobs=${2:-2}
out=runs/grid-saturated
sft="--epochs 3 --lr 3e-4 --warmup-ratio 0.05 --max-new-tokens 200 --eval-batch-size 64"  # PRESETS["saturated"].sft_settings
T=$(python -c "from qtune.testbed import build_testbed; print(build_testbed().root)")
# Rho-1 and Token Cleaning compare with a reference model: the base model fine-tuned on the dev
# split (300 records, no question shared with train or test), full data, the same settings.
if [ ! -e "$out/reference/model/config.json" ]; then
    OMP_NUM_THREADS=1 qtune train --model "$T/model" --data "$T/dev.jsonl" --method full --batch-size 4 \
        --epochs 3 --lr 3e-4 --warmup-ratio 0.05 --out "$out/reference"
fi
# The primary methods first, then the paper's baselines (its Tables 2-3: sample rule + token rule),
# Rho-1 and Token Cleaning. The controls oracle_ratio and anti_oracle ignore r_token: their two
# budgets of one r_sample are replications of one training run.
methods=full,oracle,random,qtuning,token_matched_random,oracle_ratio,anti_oracle
methods+=,random+perplexity,longest+random,longest+perplexity,entropy+random,entropy+perplexity
methods+=,infobatch+random,infobatch+perplexity,random+rho1,random+token_cleaning
settings="--testbed saturated --seeds 0,1,2 $sft --jobs $jobs"
common="$settings --methods $methods --reference-model $out/reference/model"
if [ "$part" = A ] || [ "$part" = all ]; then
    qtune bench $common --batch-size 4 --budgets 0.25x0.5,0.25x0.7 --out "$out/b4"
fi
if [ "$part" = B ] || [ "$part" = all ]; then
    qtune bench $common --batch-size 8 --budgets 0.125x0.5,0.125x0.7 --out "$out/b8"
fi
if [ "$part" = C ]; then
    qtune bench $settings --methods oracle_ratio+random --batch-size 4 --budgets 0.25x0.5,0.25x0.7 \
        --out "$out/ceiling-b4"
    qtune bench $settings --methods oracle_ratio+random --batch-size 8 --budgets 0.125x0.5,0.125x0.7 \
        --out "$out/ceiling-b8"
fi

#!/usr/bin/env bash
# Reproduces the calibration numbers of the data-starved preset in docs/testbed.md with the qtune
# commands themselves: base-model accuracy, the per-category quadrant tables of the base model and
# of the model after one epoch of full-data SFT, and the EU-plane scoring of the real GSM8K test set.
# Training and evaluation use the preset's own settings (PRESETS["data-starved"].sft_settings), the
# training for one epoch instead of its five.
# Full-data SFT accuracy and its wall time come from the benchmark in the README
# (bench/configs/data-starved-grid.yaml).
# Usage: bash bench/testbed_calibration.sh [OUT]   (default OUT: runs/calibration)
set -euo pipefail
out=${1:-runs/calibration}
qtune=${QTUNE:-qtune}
root=$(python -c "from qtune.testbed import build_testbed; print(build_testbed(preset='data-starved').root)")

$qtune eval --model "$root/model" --data "$root/test.jsonl" --out "$out/eval-base" \
    $(python bench/preset_options.py data-starved eval) --no-perplexity
$qtune score --model "$root/model" --data "$root/train.jsonl" --out "$out/score-base" --batch-size 32
$qtune train --model "$root/model" --data "$root/train.jsonl" --out "$out/sft-1epoch" \
    --method full $(python bench/preset_options.py data-starved train) --epochs 1 --save-steps 100000 --no-progress
$qtune score --model "$out/sft-1epoch/model" --data "$root/train.jsonl" --out "$out/score-sft-1epoch" \
    --batch-size 32
$qtune score --model "$root/model" --data ../shared/data/gsm8k/test.jsonl --out "$out/score-gsm8k-test" \
    --batch-size 32

#!/usr/bin/env bash
# Q-Tuning's ablations and the static selectors (issue 12) on the default (saturated) testbed
# preset, as planned in docs/bench.md ("Q-Tuning's ablations and the static selectors on the
# saturated preset"), plan written before any of their cells ran. The reference rows (full data,
# random and Q-Tuning at 25% x 50%) are part A of bench/saturated_grid.sh.
# Each ablation is one config, bench/configs/saturated-ablations/<switch>.yaml; training on each
# static selection is bench/configs/saturated-static.yaml with the selection as --data (the
# preset's own settings, PRESETS["saturated"].sft_settings, are the defaults under their
# `testbed: saturated`). This script makes the selections and runs the configs, JOBS at a time.
# Usage: bash bench/saturated_zoo.sh [select|static|ablations|all] [JOBS]   (default: all, 2 jobs)
#   SELECTORS="rds grads" bash bench/saturated_zoo.sh static   runs only those selectors
#   select: the static selections only; static: selections, then training on each subset;
#   ablations: Q-Tuning's switches; all: static, then ablations
# Then:  python bench/saturated_zoo_report.py
# Every part resumes: a finished cell or selection is skipped.
set -euo pipefail
part=${1:-all}
jobs=${2:-2}
out=runs/grid-saturated
# Each bench below runs its 3 seeds one after the other with one torch thread, and JOBS benches
# run at once (one bench per selector or switch: with --jobs, a bench of 3 cells would leave a
# core idle for its third).
export OMP_NUM_THREADS=1
T=$(python -c "from qtune.testbed import build_testbed; print(build_testbed().root)")
mkdir -p "$out"

in_background() {  # run "$@" in the background, its output in the log named first; at most JOBS at once
    local log=$1; shift
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    echo "started: $* (log: $log)"
    ( "$@" > "$log" 2>&1 && echo "finished: $log" || echo "FAILED: $log" ) &
}

selectors=${SELECTORS:-"random perplexity ifd diversity hardness less qtuning rds grads thtb"}
if [ "$part" = select ] || [ "$part" = static ] || [ "$part" = all ]; then
    mkdir -p "$out/static"
    for selector in $selectors; do
        sel="$out/static/$selector/select"
        if [ ! -e "$sel/summary.json" ]; then
            extra=""
            [ "$selector" = less ] && extra="--target-data $T/dev.jsonl --less-lora-r 8 --less-lr 3e-4"
            [ "$selector" = rds ] && extra="--target-data $T/dev.jsonl --no-scores"
            [ "$selector" = grads ] && extra="--no-scores"
            [ "$selector" = thtb ] && extra="--no-scores"  # the default judge, smollm2-135m-instruct
            OMP_NUM_THREADS=2 qtune select --model "$T/model" --data "$T/train.jsonl" --selector "$selector" \
                --ratio 0.25 --seed 0 --no-plot $extra --out "$sel" > "$out/static/$selector.select.log" 2>&1 \
                || { echo "FAILED: selection $selector (log: $out/static/$selector.select.log)"; exit 1; }
            echo "selected: $selector"
        fi
    done
fi
if [ "$part" = static ] || [ "$part" = all ]; then
    for selector in $selectors; do
        in_background "$out/static/$selector.bench.log" qtune bench --config bench/configs/saturated-static.yaml \
            --data "$out/static/$selector/select/selected.jsonl" --out "$out/static/$selector/bench"
    done
fi

if [ "$part" = ablations ] || [ "$part" = all ]; then
    mkdir -p "$out/ablations"
    for config in bench/configs/saturated-ablations/*.yaml; do
        name=$(basename "$config" .yaml)
        in_background "$out/ablations/$name.log" qtune bench --config "$config"
    done
fi
wait

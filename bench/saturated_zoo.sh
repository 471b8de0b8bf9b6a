#!/usr/bin/env bash
# Q-Tuning's ablations and the static selectors (issue 12) on the default (saturated) testbed
# preset, as planned in docs/bench.md ("Q-Tuning's ablations and the static selectors on the
# saturated preset"), plan written before any of their cells ran. The reference rows (full data,
# random and Q-Tuning at 25% x 50%) are part A of bench/saturated_grid.sh.
# Usage: bash bench/saturated_zoo.sh [select|static|ablations|all] [JOBS]   (default: all, 2 jobs)
#   select: the static selections only; static: selections, then training on each subset;
#   ablations: Q-Tuning's switches; all: static, then ablations
# Then:  python bench/saturated_zoo_report.py
# Every part resumes: a finished cell or selection is skipped.
set -euo pipefail
part=${1:-all}
jobs=${2:-2}
out=runs/grid-saturated
sft="--epochs 3 --lr 3e-4 --warmup-ratio 0.05 --max-new-tokens 200 --eval-batch-size 64"  # PRESETS["saturated"].sft_settings
# Each bench below runs its 3 seeds one after the other with one torch thread, and JOBS benches
# run at once (one bench per selector or switch: with --jobs, a bench of 3 cells would leave a
# core idle for its third).
common="--testbed saturated --batch-size 4 --seeds 0,1,2 $sft --jobs 1 --no-plots"
export OMP_NUM_THREADS=1
T=$(python -c "from qtune.testbed import build_testbed; print(build_testbed().root)")
mkdir -p "$out"

in_background() {  # run "$@" in the background, its output in the log named first; at most JOBS at once
    local log=$1; shift
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    echo "started: $* (log: $log)"
    ( "$@" > "$log" 2>&1 && echo "finished: $log" || echo "FAILED: $log" ) &
}

selectors="random perplexity ifd diversity hardness less qtuning"
if [ "$part" = select ] || [ "$part" = static ] || [ "$part" = all ]; then
    mkdir -p "$out/static"
    for selector in $selectors; do
        sel="$out/static/$selector/select"
        if [ ! -e "$sel/summary.json" ]; then
            extra=""
            [ "$selector" = less ] && extra="--target-data $T/dev.jsonl --less-lora-r 8 --less-lr 3e-4"
            OMP_NUM_THREADS=2 qtune select --model "$T/model" --data "$T/train.jsonl" --selector "$selector" \
                --ratio 0.25 --seed 0 --no-plot $extra --out "$sel" > "$out/static/$selector.select.log" 2>&1 \
                || { echo "FAILED: selection $selector (log: $out/static/$selector.select.log)"; exit 1; }
            echo "selected: $selector"
        fi
    done
fi
if [ "$part" = static ] || [ "$part" = all ]; then
    for selector in $selectors; do
        in_background "$out/static/$selector.bench.log" qtune bench $common --methods full \
            --data "$out/static/$selector/select/selected.jsonl" --out "$out/static/$selector/bench"
    done
fi

if [ "$part" = ablations ] || [ "$part" = all ]; then
    mkdir -p "$out/ablations"
    for switch in "--stages sample" "--stages token" "--keep-q1" "--prune-q4" "--reversed-tokens"; do
        name=$(echo "$switch" | sed 's/^--//; s/ /-/g')
        in_background "$out/ablations/$name.log" qtune bench $common --methods qtuning --budgets 0.25x0.5 $switch \
            --out "$out/ablations/$name"
    done
fi
wait

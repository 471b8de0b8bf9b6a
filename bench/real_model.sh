#!/usr/bin/env bash
# The real-model measurements of issue 26 (docs/audit.md "Results", docs/bench.md "A first
# measurement on a real pretrained model"), each resumable by rerunning:
#   1. `qtune audit` on GSM8K train with SmolLM2-135M-Instruct, three planting seeds (every
#      selector but less and every sample rule at 25%; the contamination count against test);
#   2. SFT on seed 0's planted sample (bench/configs/real-smollm2-gsm8k.yaml);
#   3. the base model evaluated as the SFT cells are (the first 500 test problems).
#   4. (audit-new and audit-grads, not in all) the audit of the rds selector (seeds 0-2) and of grads
#      (seed 0) on the same draws (docs/audit.md, "RDS+, GrADS and THTB on GSM8K with the real model").
# Usage: bash bench/real_model.sh [audit|sft|base|all|audit-new|audit-grads]   (default all; run from the project root)
set -euo pipefail
part=${1:-all}
gsm8k=../shared/data/gsm8k
if [ "$part" = audit ] || [ "$part" = all ]; then
    for seed in 0 1 2; do
        [ -e "runs/audit-gsm8k-seed$seed/audit.json" ] && continue
        rm -rf "runs/audit-gsm8k-seed$seed"
        qtune audit --data $gsm8k/train.jsonl --eval-data $gsm8k/test.jsonl --seed $seed \
            --out "runs/audit-gsm8k-seed$seed"
    done
fi
if [ "$part" = sft ] || [ "$part" = all ]; then
    qtune bench --config bench/configs/real-smollm2-gsm8k.yaml
fi
if [ "$part" = base ] || [ "$part" = all ]; then
    [ -e runs/real-smollm2-gsm8k-base/metrics.json ] || \
        qtune eval --model smollm2-135m-instruct --data $gsm8k/test.jsonl --limit 500 \
            --out runs/real-smollm2-gsm8k-base  # the defaults: 256 new tokens, 16 prompts at once, as the config
fi
if [ "$part" = audit-new ] || [ "$part" = audit-grads ]; then
    target=runs/gsm8k-test-1001-1064.jsonl  # test problems no qtune run evaluates on (they take the first 500)
    [ -e $target ] || sed -n 1001,1064p $gsm8k/test.jsonl > $target
    selectors=rds; seeds="0 1 2"; name=new
    # grads apart, on seed 0: its LoRA epoch and per-sample backward passes take over an hour a seed on 2 CPU cores
    [ "$part" = audit-grads ] && { selectors=grads; seeds=0; name=grads; }
    for seed in $seeds; do
        [ -e "runs/audit-gsm8k-$name-seed$seed/audit.json" ] && continue
        rm -rf "runs/audit-gsm8k-$name-seed$seed"
        qtune audit --data $gsm8k/train.jsonl --eval-data $gsm8k/test.jsonl --seed $seed \
            --rules none --token-rules none --selectors $selectors --target-data $target \
            --out "runs/audit-gsm8k-$name-seed$seed"
    done
fi

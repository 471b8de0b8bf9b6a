#!/usr/bin/env bash
# The four token objectives on the saturated preset's three draws x 3 seeds, one config each, in
# turn (docs/bench.md, "Token objectives on the three draws"); resumable: finished cells are reused.
#   bash bench/saturated_objectives.sh [dft asft psft eaft]
set -euo pipefail
cd "$(dirname "$0")/.."
losses=("$@"); [ ${#losses[@]} -gt 0 ] || losses=(dft asft psft eaft)
for loss in "${losses[@]}"; do
    qtune bench --config "bench/configs/saturated-objectives/$loss.yaml"
done

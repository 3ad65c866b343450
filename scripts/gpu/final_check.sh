#!/usr/bin/env bash
# GPU run: the shipped model at batch 1 and in batches of 50 after the row-transfer fix, plus the
# graph token check. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda > /dev/null 2>&1
source scripts/gpu/check_tokens.sh 2>&1 | tee "$OUT/equal.txt"
timeout 120 "$L" bench --data "$G/data" -n 2 --modes ar,sd-static,lantern++-2 --device cuda 2>&1 | tail -14 | tee "$OUT/single.txt"
timeout 200 "$L" bench --data "$G/data" -n 20 --batch 50 --timed 2 --modes ar,sd-static,lantern++-2 --device cuda 2>&1 | tail -14 | tee "$OUT/batched.txt"
echo "total ${SECONDS}s"

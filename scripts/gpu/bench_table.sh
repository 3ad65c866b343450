#!/usr/bin/env bash
# GPU run: issue 6's table on the shipped model, 500 images per mode (50 per class): quality
# columns from batches of 50, latency from 20 images generated one at a time. MODES picks the
# rows (two calls keep each under the device's 10-minute limit). Tables under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda > /dev/null 2>&1   # kernel JIT warm-up
echo "warm-up ${SECONDS}s"
if [ -n "${QUICK:-}" ]; then
  timeout 150 "$L" bench --data "$G/data" -n 2 --modes ar,sd-static,lantern++-2 --device cuda 2>&1 | tail -16 | tee "$OUT/quick.txt"
  timeout 150 "$L" bench --data "$G/data" -n 5 --batch 50 --timed 2 --modes ar,sd-static,lantern++-2,lantern-0.2 --device cuda 2>&1 | tail -12 | tee "$OUT/calib.txt"
  echo "quick ${SECONDS}s"
fi
timeout "${LIMIT:-420}" "$L" bench --data "$G/data" -n "${N:-50}" --batch 50 --timed 20 --modes "$MODES" --device cuda 2>&1 | tail -40 | tee "$OUT/table.txt"
echo "total ${SECONDS}s"

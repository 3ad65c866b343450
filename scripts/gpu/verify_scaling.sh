#!/usr/bin/env bash
# GPU run: verification cost against tree size at GPT-XL shapes (graph and ordinary), and
# batched throughput of the shipped model (200 images per mode in batches of 50).
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda > /dev/null 2>&1
for n in 2 8 16 32 59 118; do
  timeout 60 "$L" bench --random-weights --preset t2i-xl-256 --tree-tokens $n --device cuda 2>&1 | grep -E "^\| (verify|decode 1 tok @248 \(cuda)"
done 2>&1 | tee "$OUT/scaling.txt"
echo "scaling ${SECONDS}s"
timeout 330 "$L" bench --data "$G/data" -n 20 --batch 50 --timed 4 --modes ar,sd-static,lantern++-2 --device cuda 2>&1 | tail -16 | tee "$OUT/batched.txt"
echo "total ${SECONDS}s"

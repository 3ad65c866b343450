#!/usr/bin/env bash
# GPU run: XL step timings with the staging-block KV write, graph == no-graph token checks,
# and a short bench of the shipped model. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda > /dev/null 2>&1
for p in t2i-xl-256 c2i-xl-384; do
  timeout 60 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -17
done 2>&1 | tee "$OUT/steps.txt"
for n in 8 16 32 118; do
  timeout 60 "$L" bench --random-weights --preset t2i-xl-256 --tree-tokens $n --device cuda 2>&1 | grep -E "^\| verify"
done 2>&1 | tee "$OUT/scaling.txt"
source scripts/gpu/check_tokens.sh 2>&1 | tee "$OUT/equal.txt"
timeout 150 "$L" bench --data "$G/data" -n 2 --modes ar,sd-static,lantern++-2 --device cuda 2>&1 | tail -14 | tee "$OUT/bench.txt"
echo "total ${SECONDS}s"

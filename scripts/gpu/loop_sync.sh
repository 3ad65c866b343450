#!/usr/bin/env bash
# GPU run (session 4): the speculative loop split at t2i-xl-256 with and without
# LANTERN_LOOP_SYNC=1 (device synchronised at the end of every phase, so each phase's timer
# holds its GPU time), same binary, same machine.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i "error" | head -5
echo "warm-up done ${SECONDS}s"
for v in "LANTERN_LOOP_SYNC=0" "LANTERN_LOOP_SYNC=1"; do
  echo "== $v"; env $v timeout 150 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 3 --loop-tokens 64 2>&1 | grep -E "graph\)|^\| mode|^\| (sd|lantern)"
done 2>&1 | tee "$OUT/loop_sync.txt"
echo "total ${SECONDS}s"

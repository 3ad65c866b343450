#!/usr/bin/env bash
# GPU run (session 5): read-bandwidth probes next to the kernel table, the few-row linears
# with 2/4/8 warps per block, and the speculative loop's per-segment profile at t2i-xl-256.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i "error" | head -5
echo "warm-up done ${SECONDS}s"
timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --read-probes --loop-images 0 2>&1 | tee "$OUT/probes.txt" | grep -v "^  "
echo "probes done ${SECONDS}s"
for w in 2 8; do
  echo "== LANTERN_SMALL_WARPS=$w"
  LANTERN_SMALL_WARPS=$w timeout 120 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 0 2>&1 | tee "$OUT/warps$w.txt" | grep -E "small|decode|verify"
done
echo "warps done ${SECONDS}s"
LANTERN_LOOP_PROFILE=1 timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 1 --loop-tokens 64 > "$OUT/loop_profile.txt" 2>&1
tail -80 "$OUT/loop_profile.txt"
echo "total ${SECONDS}s"

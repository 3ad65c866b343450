#!/usr/bin/env bash
# GPU run (session 5): the speculative loop's per-segment profile at t2i-xl-256, with the
# fixed-shape steps' own segments (graph inputs, replay, KV staging commit, output copy).
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i "error" | head -5
echo "warm-up done ${SECONDS}s"
LANTERN_LOOP_PROFILE=1 timeout 200 "$L" bench --random-weights --preset ${PRESET:-t2i-xl-256} --device cuda --loop-images 1 --loop-tokens 64 > "$OUT/loop_profile.txt" 2>&1
grep -v "^  \|^$" "$OUT/loop_profile.txt" | tail -${TAIL:-75}
echo "total ${SECONDS}s"

#!/usr/bin/env bash
# GPU run (session 6): static trees drafted in one computation. Step table with the new
# "drafting phase" row and the loop rows for both presets, then the synced loop profile of every
# mode (t2i; static modes show the drafting phase as one segment).
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
echo "profilers: $(command -v nsys ncu nvprof 2>/dev/null | tr '\n' ' ')"
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i error | head -3
for p in t2i-xl-256 c2i-xl-384; do
  timeout 200 "$L" bench --random-weights --preset $p --device cuda --loop-images 3 --loop-tokens 64 > "$OUT/steps_$p.txt" 2>&1
  echo "== $p"; grep -E "^\| (decode|verify|drafter|drafting|ar|sd|lantern)|^  (AR|SD|LANTERN|VQ)" "$OUT/steps_$p.txt"
done
LANTERN_LOOP_PROFILE=1 timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 1 --loop-tokens 64 > "$OUT/loop_profile.txt" 2>&1
grep -E "^loop profile|^\| (step|draft|drafter|verify|target|accept|feed|total)" "$OUT/loop_profile.txt"
echo "total ${SECONDS}s"

#!/usr/bin/env bash
# GPU run (session 11): the full step bench of both presets (tables under $OUT), the loop's
# per-segment profile (t2i), then Nsight Compute over a few steps of one loop mode only
# (`bench --loop-only --loop-modes MODE`, kernels serialised, `gpu__time_duration` per kernel
# node of the graphs): $OUT/ncu_MODE.csv holds every kernel in launch order for offline
# attribution; the summary groups them by name. MODES (default sd-static) picks the modes.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i error | head -3
echo "warm-up ${SECONDS}s"
if [ -z "${SKIP_BENCH:-}" ]; then
  for p in t2i-xl-256 c2i-xl-384; do
    timeout 240 "$L" bench --random-weights --preset $p --device cuda --loop-images 2 --loop-tokens 64 > "$OUT/bench_$p.txt" 2>&1
    echo "== $p rc $? (${SECONDS}s)"
    grep -E "^\| (decode|verify|drafter|drafting|VQ|sd |lantern|ar )|target|>=|<=|  (AR|SD|LANTERN)" "$OUT/bench_$p.txt" | head -40
  done
  LANTERN_LOOP_PROFILE=1 timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-only --loop-images 1 --loop-tokens 64 > "$OUT/loop_profile.txt" 2>&1
  echo "== loop profile rc $? (${SECONDS}s)"
fi
NCU=${NCU:-/usr/local/cuda/bin/ncu}
for m in ${MODES:-sd-static}; do
  timeout ${NCU_LIMIT:-240} "$NCU" --metrics gpu__time_duration.sum --csv --page raw \
    "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-only --loop-modes $m \
    --loop-images 1 --loop-tokens ${NCU_TOKENS:-6} > "$OUT/ncu_$m.csv" 2> "$OUT/ncu_$m.err"
  echo "== ncu $m rc $? (${SECONDS}s): $(wc -l < "$OUT/ncu_$m.csv") lines"; tail -2 "$OUT/ncu_$m.err"
done
echo "total ${SECONDS}s"

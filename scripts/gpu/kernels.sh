#!/usr/bin/env bash
# GPU run: the CUDA-vs-CPU kernel test and the per-kernel breakdown of one XL layer
# (bench --random-weights prints it after the step table on CUDA). Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
"$L" bench --random-weights --preset tiny --device cuda 2>&1 | grep -i "error" | head -5
LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked" | tee "$OUT/kernel_test.txt"
for p in ${PRESETS:-t2i-xl-256}; do
  echo "== $p"; timeout 100 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -60
done 2>&1 | tee "$OUT/steps.txt"
if [ -n "${FULL:-}" ]; then
  source scripts/gpu/check_tokens.sh 2>&1 | tee "$OUT/equal.txt"
  M="ar,sd-static,lantern++-2"
  { echo "== LANTERN_FUSED=0"; LANTERN_FUSED=0 timeout 150 "$L" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -12
    echo "== fused"; timeout 150 "$L" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -12
  } 2>&1 | tee "$OUT/bench.txt"
fi
echo "total ${SECONDS}s"

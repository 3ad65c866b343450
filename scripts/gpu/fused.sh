#!/usr/bin/env bash
# GPU run (session 3): our fused kernels (norm+residual, silu*up, RoPE+K/V write, masked
# attention) against the same binary with LANTERN_FUSED=0, on the same machine in one run;
# plus the CUDA-vs-CPU test of the kernels and the graph token check. Tables under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
"$L" bench --random-weights --preset tiny --device cuda 2>&1 | grep -i "error" | head -5 | tee "$OUT/tiny_errors.txt"
LANTERN_FUSED=0 "$L" bench --random-weights --preset tiny --device cuda > /dev/null 2>&1
echo "warm-up done ${SECONDS}s"
LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked" | tee "$OUT/kernel_test.txt"
for p in t2i-xl-256 c2i-xl-384; do
  echo "== LANTERN_FUSED=0, $p"; LANTERN_FUSED=0 timeout 100 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -60 | head -20
  echo "== fused, $p"; timeout 100 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -60
done 2>&1 | tee "$OUT/steps.txt"
source scripts/gpu/check_tokens.sh 2>&1 | tee "$OUT/equal.txt"
M="ar,sd-static,lantern++-2"
{
echo "== LANTERN_FUSED=0"; LANTERN_FUSED=0 timeout 150 "$L" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -12
echo "== fused"; timeout 150 "$L" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -22
} 2>&1 | tee "$OUT/bench.txt"
echo "total ${SECONDS}s"

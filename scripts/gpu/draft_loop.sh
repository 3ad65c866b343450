#!/usr/bin/env bash
# GPU run (session 4): device-side drafting picks. Two CUDA binaries in one run: $G/lantern-base
# (main before the change: host rows per drafting level) and $G/lantern (picks on the device).
# Per preset: step table + the speculative loop split (--loop-images) of both; the kernel test;
# token checks (graphs vs none; base vs new binary); the shipped-model bench of both (unless
# SKIP_SHIPPED is set). Also used for later A/B runs of two binaries (PRESETS to narrow).
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
echo "warm-up done ${SECONDS}s"
LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked" | tee "$OUT/kernel_test.txt"
for p in ${PRESETS:-t2i-xl-256 c2i-xl-384}; do
  for bin in "$B" "$L"; do
    echo "== $bin, $p"; timeout 200 "$bin" bench --random-weights --preset $p --device cuda --loop-images 3 --loop-tokens 64 2>&1 | grep -v "^| \(norm\|rope\|attention\|silu\|wqkv\|wo \|w1\|w2\|small\)"
  done
done 2>&1 | tee "$OUT/steps.txt"
echo "steps done ${SECONDS}s"
source scripts/gpu/check_tokens.sh 2>&1 | tee "$OUT/equal.txt"
same_tokens "new vs base binary" "$L" "$B" "sd --tree dynamic --temperature 0" "sd --tree dynamic" "lantern++ --tree naive_extend_57" "lantern --tree dynamic" 2>&1 | tee -a "$OUT/equal.txt"
[ -n "${SKIP_SHIPPED:-}" ] && { echo "total ${SECONDS}s"; exit 0; }
M="ar,sd-static,lantern++-2"
{ echo "== base"; timeout 150 "$B" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -12
  echo "== new"; timeout 150 "$L" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -22
} 2>&1 | tee "$OUT/bench.txt"
echo "total ${SECONDS}s"

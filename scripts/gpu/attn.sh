#!/usr/bin/env bash
# GPU run (session 5): where the attention kernels' time goes. The tensor-core (verify) kernel
# with only some phases (LANTERN_MMA_VARIANT 0 none, 1 scores, 3 + softmax, 5 scores + P V).
# (Runs 6-7 of docs/BENCHMARKS.md §0000, at 79d8b7a and 1d062af, also tried variants 15 and
# 23 and LANTERN_ATTN_PREFETCH=1; 23 became the kernel, the others were removed.)
set -uo pipefail
source scripts/gpu/env.sh
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i "error" | head -5
echo "warm-up done ${SECONDS}s"
for e in ${TESTS:-X=0}; do
  echo "== kernel test $e"; env $e LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked|^test "
done 2>&1 | tee "$OUT/kernel_test.txt"
for p in ${PRESETS:-t2i-xl-256 c2i-xl-384}; do
  for e in ${VARIANTS:-X=0 LANTERN_MMA_VARIANT=0 LANTERN_MMA_VARIANT=1 LANTERN_MMA_VARIANT=3 LANTERN_MMA_VARIANT=5 X=1}; do
    echo "== $p $e"; env $e timeout 120 "$L" bench --random-weights --preset $p --device cuda --loop-images 0 2>&1 | grep -E "attention|decode 1 tok|verify 59"
  done
done 2>&1 | tee "$OUT/attn.txt"
echo "total ${SECONDS}s"

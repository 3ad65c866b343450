#!/usr/bin/env bash
# GPU run (session 5): the speculative loop and the shipped model, two binaries in one run:
# $G/lantern-base (the binary to compare against) and $G/lantern; kernel test, token checks,
# then the loop profile of the new binary. PRESETS and TOKENS narrow it.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
echo "warm-up done ${SECONDS}s"
LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked|^test " | tee "$OUT/kernel_test.txt"
for p in ${PRESETS:-t2i-xl-256 c2i-xl-384}; do
  for bin in "$B" "$L"; do
    f="$OUT/bench_$(basename $bin)_$p.txt"
    echo "== $bin, $p"; timeout 200 "$bin" bench --random-weights --preset $p --device cuda --loop-images 3 --loop-tokens ${TOKENS:-64} > "$f" 2>&1
    grep -E "^\| (ar|sd|lantern|mode)|decode 1 tok|verify 59|drafter 10|attention" "$f"
  done
done 2>&1 | tee "$OUT/loop.txt"
echo "loop done ${SECONDS}s"
same_tokens "new vs base binary" "$L" "$B" "sd --tree dynamic --temperature 0" "lantern++ --tree naive_extend_57" "lantern --tree dynamic" 2>&1 | tee "$OUT/equal.txt"
same_tokens "graphs vs none" "$L" "env LANTERN_CUDA_GRAPHS=0 $L" "ar" "sd --tree dynamic --temperature 0" "lantern++ --tree naive_extend_57" 2>&1 | tee -a "$OUT/equal.txt"
M="ar,sd-static,lantern++-2"
{ echo "== base"; timeout 150 "$B" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -8
  echo "== new"; timeout 150 "$L" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -8
} 2>&1 | tee "$OUT/bench.txt"
echo "shipped done ${SECONDS}s"
LANTERN_LOOP_PROFILE=1 timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 1 --loop-tokens 64 > "$OUT/loop_profile.txt" 2>&1
grep -B2 -A30 "^loop profile" "$OUT/loop_profile.txt" | tail -32
echo "total ${SECONDS}s"

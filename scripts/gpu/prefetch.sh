#!/usr/bin/env bash
# (The L2 prefetch it measured was reverted after this run: no gain; the script stays as the record of
# docs/BENCHMARKS.md §0000, run at commit d0decd1.)
# GPU run (session 5): L2 prefetch of the next linear's weights in the decode kernels and the
# per-size warps choice. Binaries: $G/lantern-base (before) and $G/lantern; the new binary also
# with LANTERN_PREFETCH=0 and with LANTERN_SMALL_WARPS=4. Kernel test, token checks, and graph
# captures during the loop bench (LANTERN_GRAPH_DEBUG).
set -uo pipefail
source scripts/gpu/env.sh
B="$G/lantern-base"; xz -dkf "$B.xz" && chmod +x "$B"
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
SECONDS=0
for bin in "$B" "$L"; do "$bin" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i "error" | head -5; done
echo "warm-up done ${SECONDS}s"
LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked" | tee "$OUT/kernel_test.txt"
F='decode 1 tok|verify 59|drafter 10|small|attention'
for p in ${PRESETS:-t2i-xl-256 c2i-xl-384}; do
  for v in "base" "new" "new LANTERN_PREFETCH=0" "new LANTERN_SMALL_WARPS=4" "base again" "new again"; do
    bin=$L; [[ $v == base* ]] && bin=$B
    e=$(echo "$v" | grep -o "LANTERN_[A-Z_]*=[0-9]*" || true)
    echo "== $p: $v"; env $e timeout 120 "$bin" bench --random-weights --preset $p --device cuda --loop-images 0 2>&1 | grep -E "$F"
  done
done 2>&1 | tee "$OUT/steps.txt"
echo "steps done ${SECONDS}s"
same_tokens "new vs base binary" "$L" "$B" "ar --temperature 0" "ar" "sd --tree dynamic" "lantern++ --tree naive_extend_57" 2>&1 | tee "$OUT/equal.txt"
same_tokens "graphs vs none" "$L" "env LANTERN_CUDA_GRAPHS=0 $L" "ar" "lantern++ --tree naive_extend_57" 2>&1 | tee -a "$OUT/equal.txt"
echo "tokens done ${SECONDS}s"
LANTERN_GRAPH_DEBUG=1 timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 2 --loop-tokens 64 > "$OUT/loop_graphs.txt" 2>&1
grep -E "^\| (ar|sd|lantern)" "$OUT/loop_graphs.txt"; grep -c "\[graph\] captured" "$OUT/loop_graphs.txt"
grep -n "\[graph\] captured\|^| mode\|speculative loop" "$OUT/loop_graphs.txt" | head -60
echo "total ${SECONDS}s"

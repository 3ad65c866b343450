#!/usr/bin/env bash
# GPU run (session 14): checks the review commit's pick kernels (the picks' CUDA-vs-CPU test in
# both modes, every CUDA kernel test, token files against the carried base build and between
# the two pick modes), then the speculative loop's profile (t2i-xl-256, SD static and LANTERN++
# static, every generation's report: the untimed first image captures the CUDA graphs, the
# second replays them) with the drafting inputs, acceptance rules and row reads as their own
# segments. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
picks_tests
kernel_tests
echo "tests done ${SECONDS}s"
{
same_tokens "as built vs base" "$L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "lantern++ --tree naive_extend_57" "lantern"
same_tokens "cluster (every row) vs one-block" "env LANTERN_PICKS_CLUSTER=all $L" "env LANTERN_PICKS_CLUSTER=0 $L" "sd --temperature 0" "sd --tree naive_extend_57" "lantern"
} 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
for m in ${MODES:-sd-static lantern++-static}; do
  LANTERN_LOOP_PROFILE=1 timeout 200 "$L" bench --random-weights --preset ${PRESET:-t2i-xl-256} --device cuda \
    --loop-only --loop-modes $m --loop-images 1 --loop-tokens ${TOKENS:-64} > "$OUT/profile_$m.txt" 2>&1
  echo "== $m"; grep -v "^  \|^$" "$OUT/profile_$m.txt" | grep -E "^\||^loop profile|rror" | grep -v "^|---"
done
echo "total ${SECONDS}s"

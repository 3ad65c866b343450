#!/usr/bin/env bash
# GPU run (session 11): the drafting-pick kernels (probabilities with the row in registers,
# draws with per-chunk masses and a shuffle scan) against the carried base binary: the picks'
# CUDA-vs-CPU test (carried library test binary $G/lantern_lib.xz) and every CUDA kernel test,
# token files new vs base, the step bench's drafting / verify / decode rows and the loop split
# (ROUNDS rounds over PRESETS, the binaries interleaved), then Nsight Compute over the pick
# kernels of a few SD-static loop steps of each binary. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
picks_tests
kernel_tests
echo "tests done ${SECONDS}s"
{
same_tokens "new vs base" "$L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "sd --tree naive_extend_57" "lantern++ --tree naive_extend_57" "lantern"
} 2>&1 | tee "$OUT/checks.txt"
ROUNDS=${ROUNDS:-3} LOOP=${LOOP:-2} VARIANTS=${VARIANTS:-BASE X=0} \
  variant_rounds "tok.*cuda graph\) \||drafting phase|^\| (sd|lantern)|over the decode|rror|panicked" 2>&1 | tee "$OUT/steps.txt"
for bin in "$B" "$L"; do ncu_picks "$(basename $bin)" "$bin"; done
echo "total ${SECONDS}s"

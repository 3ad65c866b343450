#!/usr/bin/env bash
# GPU run (session 10): the one-query attention moves its head's older K/V rows towards L2
# before waiting for the wqkv kernel (programmatic dependent launch), against the carried base
# binary without it: every CUDA kernel test, the step bench's decode / verify / drafter rows
# and targets table (ROUNDS rounds over PRESETS, the two binaries interleaved), token files new
# vs base. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
kernel_tests
echo "tests done ${SECONDS}s"
ROUNDS=${ROUNDS:-3} VARIANTS=${VARIANTS:-BASE X=0} \
  variant_rounds "tok.*cuda graph\) \||attention over|rror|panicked|bandwidth bound \||over the decode" 2>&1 | tee "$OUT/steps.txt"
{
same_tokens "new vs base" "$L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "lantern++ --tree naive_extend_57" "lantern"
} 2>&1 | tee "$OUT/checks.txt"
echo "total ${SECONDS}s"

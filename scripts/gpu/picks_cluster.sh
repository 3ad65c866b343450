#!/usr/bin/env bash
# GPU run (session 13): the drafting picks over a thread-block cluster per row (probabilities
# and draws split over 8 SMs) against the same binary's one-block kernels
# (LANTERN_PICKS_CLUSTER=0, the v2 kernels: 1024-thread probabilities, draws with chunks in
# registers) and the carried base binary (b40ebef, the v1 kernels): the picks' CUDA-vs-CPU test
# in both modes (carried library test binary $G/lantern_lib.xz), every CUDA kernel test, token
# files, Nsight Compute over the pick kernels, then ROUNDS rounds of the step bench (the
# binaries and modes interleaved). Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
picks_tests
kernel_tests
echo "tests done ${SECONDS}s"
{
same_tokens "one-block v2 vs base" "env LANTERN_PICKS_CLUSTER=0 $L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "lantern++ --tree naive_extend_57" "lantern"
same_tokens "cluster (every row) vs one-block v2" "env LANTERN_PICKS_CLUSTER=all $L" "env LANTERN_PICKS_CLUSTER=0 $L" "sd --temperature 0" "sd --tree naive_extend_57" "lantern++ --tree naive_extend_57" "lantern"
} 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
ncu_picks cluster "$L"
ncu_picks oneblock env LANTERN_PICKS_CLUSTER=0 "$L"
ncu_picks base "$B"
echo "ncu done ${SECONDS}s"
ROUNDS=${ROUNDS:-2} LOOP=${LOOP:-1} VARIANTS=${VARIANTS:-BASE LANTERN_PICKS_CLUSTER=0 X=0} \
  variant_rounds "tok.*cuda graph\) \||drafting phase|^\| (sd|lantern)|over the decode|rror|panicked" 2>&1 | tee "$OUT/steps.txt"
echo "total ${SECONDS}s"

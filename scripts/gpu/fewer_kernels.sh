#!/usr/bin/env bash
# GPU run (session 14): fewer kernels per forward (RoPE rows from one packed gather, the
# drafter's fc input in one embed_cat kernel, level-major drafting positions) against the
# carried base build ($G/lantern-base.xz, the previous commit's binary): every CUDA kernel test
# (with the new embed_cat one), token files against the base, then interleaved rounds of the
# step bench (t2i with the loop rows, c2i without). Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
kernel_tests
echo "tests done ${SECONDS}s"
same_tokens "new vs base" "$L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "sd --tree naive_extend_57" "lantern++ --tree naive_extend_57" "lantern" 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
RE="tok.*cuda graph\) \||drafting phase|^\| (ar|sd|lantern)|over the decode|rror|panicked"
ROUNDS=${ROUNDS:-2} PRESETS=t2i-xl-256 LOOP=1 VARIANTS="BASE X=0" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_t2i.txt"
ROUNDS=1 PRESETS=c2i-xl-384 LOOP=0 VARIANTS="BASE X=0" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_c2i.txt"
echo "total ${SECONDS}s"

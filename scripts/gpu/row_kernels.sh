#!/usr/bin/env bash
# GPU run (session 15): the norm (one warp per row) and SiLU-mul (16-byte chunks) kernels and
# the cuBLASLt projections, against the carried base build ($G/lantern-base.xz): CUDA kernel
# tests (the row kernels bit for bit against the plain ones), token files (LANTERN_GEMM=cublas
# must equal the base: the row kernels give the same bits), then ROUNDS interleaved rounds of the
# step bench over base / new with candle's matmul / new as built (t2i with LOOP images of loop
# rows, c2i without). Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
ab_start
if [ "${SKIP_TOKENS:-0}" != 1 ]; then
  same_tokens "new (cublas) vs base" "env LANTERN_GEMM=cublas $L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "sd --tree naive_extend_57" "lantern++ --tree naive_extend_57" "lantern"
  same_tokens "new vs base" "$L" "$B" "ar --temperature 0" "sd --tree naive_extend_57" "lantern"
fi 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
RE="tok.*cuda graph\) \||drafting phase|^\| (ar|sd|lantern)|^\| (norm|silu|attention).*\| 59 \||over the decode|rror|panicked"
V=${VARIANTS:-BASE LANTERN_GEMM=cublas X=0}
ROUNDS=${ROUNDS:-2} PRESETS=t2i-xl-256 LOOP=${LOOP:-1} VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_t2i.txt"
echo "t2i done ${SECONDS}s"
[ "${SKIP_C2I:-0}" = 1 ] || ROUNDS=1 PRESETS=c2i-xl-384 LOOP=0 VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_c2i.txt"
echo "total ${SECONDS}s"

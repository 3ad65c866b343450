#!/usr/bin/env bash
# GPU run (session 15): projections of many rows through cuBLASLt (`fused::linear`) under the
# three GEMM policies of one binary (LANTERN_GEMM=cublas = candle's matmul, as before;
# heuristic = cuBLASLt's first answer with a workspace; timed = its candidates timed per shape),
# against the carried base build ($G/lantern-base.xz): CUDA kernel tests, token files (cublas
# must equal the base), the timed choices per shape, then ROUNDS interleaved rounds of the step
# bench (t2i with LOOP images of loop rows, c2i without). Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
ab_start
if [ "${SKIP_TOKENS:-0}" != 1 ]; then
  same_tokens "cublas vs base" "env LANTERN_GEMM=cublas $L" "$B" "ar --temperature 0" "sd --tree naive_extend_57" "lantern"
  same_tokens "heuristic vs cublas" "env LANTERN_GEMM=heuristic $L" "env LANTERN_GEMM=cublas $L" "ar --temperature 0" "sd --temperature 0" "sd --tree naive_extend_57" "lantern"
  same_tokens "timed vs cublas" "env LANTERN_GEMM=timed $L" "env LANTERN_GEMM=cublas $L" "ar --temperature 0" "sd --tree naive_extend_57"
fi 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
for pol in heuristic timed; do
  echo "== gemm choices ($pol, t2i-xl-256 step bench)"
  LANTERN_GEMM=$pol LANTERN_GEMM_LOG=1 timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 0 > "$OUT/choices_$pol.txt" 2>&1
  grep "^gemm" "$OUT/choices_$pol.txt" | sort | uniq
done
echo "choices done ${SECONDS}s"
RE="tok.*cuda graph\) \||drafting phase|^\| (ar|sd|lantern)|over the decode|rror|panicked"
V="LANTERN_GEMM=cublas LANTERN_GEMM=heuristic LANTERN_GEMM=timed"
ROUNDS=${ROUNDS:-2} PRESETS=t2i-xl-256 LOOP=${LOOP:-1} VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_t2i.txt"
echo "t2i done ${SECONDS}s"
[ "${SKIP_C2I:-0}" = 1 ] || ROUNDS=1 PRESETS=c2i-xl-384 LOOP=0 VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_c2i.txt"
echo "total ${SECONDS}s"

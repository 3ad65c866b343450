#!/usr/bin/env bash
# GPU run (session 17): the many-row block's wo and w2 as split-K tensor-core products whose
# slices the following residual add + RMSNorm sums (fused/split_k.rs, opt-in:
# LANTERN_SPLIT_K=1), against the separate ops in the same binary (the default: cuBLAS,
# SiLU-mul, add_rms_norm, bit-identical to the previous build). CUDA kernel tests; token files (split-K on vs off, and greedy speculative =
# greedy AR with it on); ROUNDS rounds of the step bench (t2i; c2i once) over VARIANTS with the
# per-layer kernel rows; with FULL=1 whole t2i images (1 image of 256 tokens; FULL_C2I=1 adds
# c2i-xl-384, 576 tokens). Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i error | head -5
[ "${SKIP_TESTS:-0}" = 1 ] || kernel_tests
echo "tests done ${SECONDS}s"
if [ "${SKIP_TOKENS:-0}" != 1 ]; then
  # the shipped model in bf16 (in f32 the split path does not serve it: tensor cores take bf16 / f16)
  BF="--dtype bf16"
  same_tokens "split-k on vs off" "env LANTERN_SPLIT_K=1 $L" "$L" "ar --temperature 0 $BF" "ar $BF" "sd --temperature 0 $BF" "sd --tree naive_extend_57 $BF" "lantern++ --tree naive_extend_57 $BF" "lantern $BF"
  for c in "env LANTERN_SPLIT_K=1 $L" "$L"; do
    greedy_equal "greedy sd = greedy ar ($c)" "$c" "ar --temperature 0 $BF" "sd --temperature 0 $BF"
    greedy_equal "greedy sd static = greedy ar ($c)" "$c" "ar --temperature 0 $BF" "sd --temperature 0 --tree naive_extend_57 $BF"
  done
fi 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
RE="tok.*cuda graph\) \||drafting phase|over the decode|^\| (norm \+ residual|silu|wo matmul|w2 matmul|split-k)|rror|panicked"
V=${VARIANTS:-X=0 LANTERN_SPLIT_K=1}
ROUNDS=${ROUNDS:-2} PRESETS=t2i-xl-256 LOOP=0 VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_t2i.txt"
echo "t2i done ${SECONDS}s"
[ "${SKIP_C2I:-0}" = 1 ] || ROUNDS=1 PRESETS=c2i-xl-384 LOOP=0 VARIANTS="${V_C2I:-$V}" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_c2i.txt"
echo "c2i done ${SECONDS}s"
[ "${FULL:-1}" = 1 ] && full_images ${V_FULL:-X=0 LANTERN_SPLIT_K=1}
[ "${REPORT:-0}" = 1 ] && step_reports
echo "total ${SECONDS}s"

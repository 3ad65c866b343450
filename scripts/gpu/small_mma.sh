#!/usr/bin/env bash
# GPU run: the few-row linears on tensor cores (`LANTERN_SMALL_MMA=1`, small_mma in kernels.cu)
# against the CUDA-core kernels: every CUDA kernel test as built and the CUDA-vs-CPU forward
# test with small_mma on, the step bench's decode and few-row kernel rows of both in one run
# (ROUNDS, PRESETS, rounds interleaved), and token checks on the shipped model. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
F="LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt"
env $F timeout 200 "$G/fused_forward" --test-threads 1 2>&1 | grep -E "^test |test result|panicked" | tee "$OUT/kernel_tests.txt"
env $F LANTERN_SMALL_MMA=1 timeout 120 "$G/fused_forward" --nocapture cuda_fused_forward 2>&1 \
  | grep -E "rel err|test result|panicked" | tee "$OUT/kernel_test_mma.txt"
echo "tests done ${SECONDS}s"
ROUNDS=${ROUNDS:-2} PRESETS=${PRESETS:-t2i-xl-256 c2i-xl-384} VARIANTS=${VARIANTS:-BASE X=0 LANTERN_SMALL_MMA=1} \
  variant_rounds "decode 1 tok|verify|small |rror" 2>&1 | tee "$OUT/steps.txt"
{
args="--class 0,7 -n 2 --device cuda --seed 3 --temperature 0"
for v in X=0 LANTERN_SMALL_MMA=1; do
  env $v "$L" generate $args --decoding ar --out /tmp/a0 --save-tokens /tmp/a0.json --force 2>&1 | grep -i error | head -3
  env $v "$L" generate $args --decoding "sd --tree naive_extend_57" --out /tmp/a1 --save-tokens /tmp/a1.json --force 2>&1 | grep -i error | head -3
  if cmp -s /tmp/a0.json /tmp/a1.json; then r=IDENTICAL; else r=DIFFER; fi
  echo "tokens greedy AR vs greedy SD static with $v: $r"
done
same_tokens "this build vs base build" "$L" "$B" "ar --temperature 0" "lantern"
same_tokens "tensor-core vs CUDA-core few-row linears" "env LANTERN_SMALL_MMA=1 $L" "$L" "ar --temperature 0" "lantern"
} 2>&1 | tee "$OUT/checks.txt"
echo "total ${SECONDS}s"

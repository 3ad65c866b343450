#!/usr/bin/env bash
# GPU run (session 9, run 7 at 9be6850): few-row linears with two adjacent weight rows per warp
# (`LANTERN_SMALL_PAIRS=1`, since removed: no faster) and the decode step's K/V write inside the
# wqkv kernel (`LANTERN_FUSED_KV=1`, small_linear_kv; now the default, `=0` turns it off): the kernel tests as built and the CUDA-vs-CPU
# forward test with both on, the step bench's decode rows and few-row kernel rows of each
# variant (ROUNDS, PRESETS, rounds interleaved), token files of every variant against the
# default. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
F="LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt"
env $F timeout 200 "$G/fused_forward" --test-threads 1 cuda_ 2>&1 | grep -E "^test |test result|panicked" | tee "$OUT/kernel_tests.txt"
env $F LANTERN_SMALL_PAIRS=1 LANTERN_FUSED_KV=1 timeout 120 "$G/fused_forward" --nocapture cuda_fused_forward 2>&1 \
  | grep -E "rel err|test result|panicked" | tee "$OUT/kernel_test_on.txt"
echo "tests done ${SECONDS}s"
V=${VARIANTS:-X=0 LANTERN_SMALL_PAIRS=1 LANTERN_FUSED_KV=1 LANTERN_SMALL_PAIRS=1+LANTERN_FUSED_KV=1}
ROUNDS=${ROUNDS:-2} VARIANTS="$V" variant_rounds "decode 1 tok|small |rror" 2>&1 | tee "$OUT/steps.txt"
{
for v in $V; do
  same_tokens "$v vs default" "env ${v//+/ } $L" "$L" "ar --temperature 0" "lantern"
done
} 2>&1 | tee "$OUT/checks.txt"
echo "total ${SECONDS}s"

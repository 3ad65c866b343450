#!/usr/bin/env bash
# GPU run (sessions 8-9): the decode step's one-kernel block (fused/decode_layer.cu). Kernel tests
# (TESTS: a name filter for the kernel test binary), then per preset and round the decode /
# verify rows of the step bench (plus AR / speculative loop rows with LOOP=N images of TOKENS
# tokens) for each variant (env.sh variant_rounds): BASE[:env] (the carried $G/lantern-base.xz),
# or env assignments joined by '+' for the new binary (X=0: as built, the separate kernels; LANTERN_DECODE_LAYER=1: the one-kernel block,
# with LANTERN_LAYER_SKIP=mask;
# LANTERN_LAYER_COOP=0: plain launch; LANTERN_LAYER_BLOCKS=N). CHECKS=1 adds token checks
# and the shipped model's bench of the variants SHIPPED. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
echo "warm-up done ${SECONDS}s"
LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt timeout 180 "$G/fused_forward" --nocapture ${TESTS:-cuda_} 2>&1 \
  | grep -E "rel err|test result|panicked|^test " | tee "$OUT/kernel_test.txt"
echo "tests done ${SECONDS}s"
ROUNDS=${ROUNDS:-1} VARIANTS=${VARIANTS:-BASE X=0 LANTERN_DECODE_LAYER=1} variant_rounds "decode 1 tok|verify 59|drafting phase|expected|^\| (ar|sd |lantern)|rror" 2>&1 | tee "$OUT/steps.txt"
if [ -n "${CHECKS:-}" ]; then
  {
  for d in "sd --tree naive_extend_57" "sd --tree dynamic"; do
    args="--class 0,7 -n 2 --device cuda --seed 3 --temperature 0"
    for on in 0 1; do
      env LANTERN_DECODE_LAYER=$on "$L" generate $args --decoding ar --out /tmp/a0 --save-tokens /tmp/a0.json --force 2>&1 | grep -i error | head -3
      env LANTERN_DECODE_LAYER=$on "$L" generate $args --decoding $d --out /tmp/a1 --save-tokens /tmp/a1.json --force 2>&1 | grep -i error | head -3
      if cmp -s /tmp/a0.json /tmp/a1.json; then r=IDENTICAL; else r=DIFFER; fi
      echo "tokens greedy AR vs greedy $d (bf16, LANTERN_DECODE_LAYER=$on): $r"
    done
  done
  same_tokens "new vs base binary" "$L" "$B" "ar --temperature 0" "ar" "lantern++ --tree naive_extend_57" "lantern --tree dynamic"
  same_tokens "one-kernel block vs separate kernels" "env LANTERN_DECODE_LAYER=1 $L" "$L" "ar --temperature 0" "ar" "lantern++ --tree naive_extend_57"
  M="ar,sd-static,lantern++-2"
  for e in ${SHIPPED:-BASE X=0 LANTERN_DECODE_LAYER=1}; do
    variant "$e"
    echo "== shipped, $(basename $bin) $envs"; env $envs timeout 150 "$bin" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | grep -E "^\| (ar|sd|lantern)"
  done
  } 2>&1 | tee "$OUT/checks.txt"
fi
echo "total ${SECONDS}s"

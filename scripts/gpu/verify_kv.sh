#!/usr/bin/env bash
# GPU run (session 10): the tree attention with the K/V write inside (`attention_write_kv`,
# default; `LANTERN_FUSED_KV=0` turns it off) against the base binary: every CUDA kernel test
# (the new one prints its cases), the step bench's decode / verify rows, attention kernel rows
# and targets table (ROUNDS rounds over PRESETS, variants interleaved), token files new vs base
# and fused vs not. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
kernel_tests
echo "tests done ${SECONDS}s"
ROUNDS=${ROUNDS:-2} VARIANTS=${VARIANTS:-BASE X=0 LANTERN_FUSED_KV=0} \
  variant_rounds "tok.*cuda graph\) \||attention|K/V write|verification|rror|panicked" 2>&1 | tee "$OUT/steps.txt"
{
same_tokens "new vs base" "$L" "$B" "sd --temperature 0" "lantern++ --tree naive_extend_57" "lantern"
same_tokens "fused K/V off vs on" "env LANTERN_FUSED_KV=0 $L" "$L" "sd --temperature 0" "lantern++ --tree naive_extend_57"
args="--class 0,7 -n 2 --device cuda --seed 3 --temperature 0"
"$L" generate $args --decoding ar --out /tmp/a0 --save-tokens /tmp/a0.json --force 2>&1 | grep -i error | head -3
"$L" generate $args --decoding sd --out /tmp/a1 --save-tokens /tmp/a1.json --force 2>&1 | grep -i error | head -3
if cmp -s /tmp/a0.json /tmp/a1.json; then r=IDENTICAL; else r=DIFFER; fi
echo "tokens greedy AR vs greedy SD: $r"
} 2>&1 | tee "$OUT/checks.txt"
echo "total ${SECONDS}s"

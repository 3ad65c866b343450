#!/usr/bin/env bash
# GPU run: batched generation (8 images per batch) through the fused kernels against the same
# binary with LANTERN_FUSED=0, f32 weights (so rounding cannot flip greedy tokens): greedy AR,
# greedy SD (static tree) and the token files compared. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
for d in "ar" "sd --tree naive_extend_57" "sd --tree dynamic"; do
  args="--class 0,3,7,9 -n 8 --batch 8 --device cuda --dtype f32 --seed 1 --temperature 0 --decoding $d"
  "$L" generate $args --out /tmp/b1 --save-tokens /tmp/b1.json --force 2>&1 | grep -iE "error|images in" | head -3
  LANTERN_FUSED=0 "$L" generate $args --out /tmp/b0 --save-tokens /tmp/b0.json --force 2>&1 | grep -iE "error|images in" | head -3
  if cmp -s /tmp/b1.json /tmp/b0.json; then r=IDENTICAL; else r=DIFFER; fi
  echo "batched tokens fused vs LANTERN_FUSED=0, --decoding $d: $r"
done 2>&1 | tee "$OUT/batched.txt"
echo "total ${SECONDS}s"

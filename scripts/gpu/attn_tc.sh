#!/usr/bin/env bash
# GPU run (session 7): the key-split tensor-core attention (attention_tc). Kernel tests, then
# per variant the attention and step rows of the step bench (plus loop rows with LOOP=N images
# of TOKENS tokens) in ROUNDS interleaved rounds. A variant is an env assignment for the new
# binary (X=0: as built; LANTERN_ATTN_KERNEL=tc, LANTERN_ATTN_WARPS=4|8|16) or BASE: the
# carried $G/lantern-base.xz (the previous kernels). CHECKS=1 adds token checks (greedy AR vs
# greedy SD; new vs base; graphs vs none) and the shipped model's bench of both binaries.
# (Earlier builds of this session also had LANTERN_ATTN_KERNEL=previous and an L1-prefetch
# variant: docs/BENCHMARKS.md §000000 runs 1-5.) Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
echo "warm-up done ${SECONDS}s"
for e in ${TESTS:-X=0}; do
  echo "== kernel test $e"; env $e LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked|^test "
done 2>&1 | tee "$OUT/kernel_test.txt"
ROUNDS=${ROUNDS:-2} VARIANTS=${VARIANTS:-BASE X=0 LANTERN_ATTN_KERNEL=tc} variant_rounds "attention|decode 1 tok|verify 59|^\| (ar|sd |lantern)" 2>&1 | tee "$OUT/attn.txt"
if [ -n "${CHECKS:-}" ]; then
  {
  for d in "sd --tree naive_extend_57" "sd --tree dynamic"; do
    args="--class 0,7 -n 2 --device cuda --seed 3 --temperature 0"
    "$L" generate $args --decoding ar --out /tmp/a0 --save-tokens /tmp/a0.json --force 2>&1 | grep -i error | head -3
    "$L" generate $args --decoding $d --out /tmp/a1 --save-tokens /tmp/a1.json --force 2>&1 | grep -i error | head -3
    if cmp -s /tmp/a0.json /tmp/a1.json; then r=IDENTICAL; else r=DIFFER; fi
    echo "tokens greedy AR vs greedy $d (bf16): $r"
  done
  same_tokens "new vs base binary" "$L" "$B" "sd --tree naive_extend_57 --temperature 0" "lantern++ --tree naive_extend_57" "lantern --tree dynamic"
  source scripts/gpu/check_tokens.sh
  M="ar,sd-static,lantern++-2"
  for bin in "$B" "$L" "$B" "$L"; do echo "== shipped, $(basename $bin)"; timeout 150 "$bin" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | grep -E "^\| (ar|sd|lantern)"; done
  } 2>&1 | tee "$OUT/checks.txt"
fi
echo "total ${SECONDS}s"

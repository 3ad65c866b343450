#!/usr/bin/env bash
# GPU run (session 7): the key-split tensor-core attention (attention_tc) against the previous
# kernels in one binary (LANTERN_ATTN_KERNEL=previous / tc-tree / tc, LANTERN_ATTN_WARPS):
# kernel tests, the attention and step rows of the step bench per variant (VARIANTS, ROUNDS
# interleaved rounds), token checks, the shipped model's bench per variant. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i "error" | head -5
echo "warm-up done ${SECONDS}s"
for e in ${TESTS:-X=0 LANTERN_ATTN_KERNEL=previous}; do
  echo "== kernel test $e"; env $e LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked|^test "
done 2>&1 | tee "$OUT/kernel_test.txt"
for r in $(seq 1 ${ROUNDS:-2}); do
  for p in ${PRESETS:-t2i-xl-256 c2i-xl-384}; do
    for e in ${VARIANTS:-LANTERN_ATTN_KERNEL=previous LANTERN_ATTN_KERNEL=tc-tree X=0 LANTERN_ATTN_WARPS=4 LANTERN_ATTN_WARPS=16}; do
      echo "== round $r $p $e"; env $e timeout 200 "$L" bench --random-weights --preset $p --device cuda --loop-images ${LOOP:-0} --loop-tokens ${TOKENS:-64} 2>&1 | grep -E "attention|decode 1 tok|verify 59|^\| (ar|sd |lantern)"
    done
  done
done 2>&1 | tee "$OUT/attn.txt"
if [ -n "${CHECKS:-}" ]; then
  {
  for e in X=0 LANTERN_ATTN_KERNEL=previous; do
    for d in "sd --tree naive_extend_57" "sd --tree dynamic"; do
      args="--class 0,7 -n 2 --device cuda --seed 3 --temperature 0"
      env $e "$L" generate $args --decoding ar --out /tmp/a0 --save-tokens /tmp/a0.json --force 2>&1 | grep -i error | head -3
      env $e "$L" generate $args --decoding $d --out /tmp/a1 --save-tokens /tmp/a1.json --force 2>&1 | grep -i error | head -3
      if cmp -s /tmp/a0.json /tmp/a1.json; then r=IDENTICAL; else r=DIFFER; fi
      echo "tokens greedy AR vs greedy $d ($e, bf16): $r"
    done
  done
  same_tokens "tc vs previous attention" "$L" "env LANTERN_ATTN_KERNEL=previous $L" "sd --tree naive_extend_57 --temperature 0" "lantern++ --tree naive_extend_57"
  source scripts/gpu/check_tokens.sh
  M="ar,sd-static,lantern++-2"
  for e in LANTERN_ATTN_KERNEL=previous X=0 LANTERN_ATTN_KERNEL=previous X=0; do echo "== shipped, $e"; env $e timeout 150 "$L" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | grep -E "^\| (ar|sd|lantern)"; done
  } 2>&1 | tee "$OUT/checks.txt"
fi
echo "total ${SECONDS}s"

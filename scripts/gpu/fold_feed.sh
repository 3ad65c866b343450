#!/usr/bin/env bash
# GPU run (session 20): the drafter feed folded into the drafting graphs (decode/feed.rs) against
# the same binary feeding on its own (LANTERN_FOLD_FEED=0) on the shipped model in bf16: tau and
# seconds per image of `generate` (classes 0-9, N images each, batched, SEEDS seeds) for the
# speculative decodings, interleaved; then the step bench's drafter and drafting-phase rows under
# each GEMM policy (LANTERN_GEMM, fused/gemm.rs). PIN=CPUS runs everything under taskset.
# Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i error | head -3
P=${PIN:+taskset -c $PIN}
[ "${SKIP_SHIPPED:-0}" = 1 ] || for seed in ${SEEDS:-3 4}; do
  for d in "lantern++ --tree naive_extend_57" "lantern --tree dynamic" "sd --tree dynamic"; do
    for e in X=0 LANTERN_FOLD_FEED=0; do
      printf '%-22s seed %s %-34s ' "$e" "$seed" "$d"
      env $e $P "$L" generate --class 0,1,2,3,4,5,6,7,8,9 -n ${N:-4} --device cuda --dtype bf16 --seed $seed \
        --decoding $d --out /tmp/ff --force 2>&1 | grep -E "images in|rror"
    done
  done
done 2>&1 | tee "$OUT/shipped_bf16.txt"
echo "shipped done ${SECONDS}s"
[ "${SKIP_GEMM:-0}" = 1 ] || for g in cublas heuristic timed; do
  echo "== LANTERN_GEMM=$g"
  env LANTERN_GEMM=$g $P "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-images 0 2>&1 \
    | grep -E "drafter 10|drafting phase|verify 59|rror"
done 2>&1 | tee "$OUT/gemm_policies.txt"
# AB=1: ROUNDS interleaved rounds (default 6) of the loop bench, new binary folded vs its own feed
# (t2i-xl-256, MODES, 3 images of TOKENS tokens), rows in $OUT/ab.txt
if [ "${AB:-0}" = 1 ]; then
  for r in $(seq 1 ${ROUNDS:-6}); do
    for e in X=0 LANTERN_FOLD_FEED=0; do
      echo "== round $r $e"
      env $e timeout 200 $P "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-only \
        --loop-modes ${MODES:-sd-static,sd-dynamic} --loop-images 3 --loop-tokens ${TOKENS:-128} 2>&1 | grep -iE "^\| (sd|lantern)|rror"
    done
  done 2>&1 | tee "$OUT/ab.txt"
  echo "ab done ${SECONDS}s"
fi
echo "total ${SECONDS}s"

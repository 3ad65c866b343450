#!/usr/bin/env bash
# GPU run (session 14): the loop's host work (acceptance passes, RoPE-row clamp in one kernel,
# host-repeated positions, flat row gathers) against the carried base build ($G/lantern-base.xz):
# CUDA kernel tests, token files against the base, ROUNDS interleaved rounds of the loop bench
# (t2i-xl-256, 2 images of 64 tokens; the new binary also times the images without phase syncs),
# the new binary's loop profile, then its full step bench of both presets (targets, expected
# latency). SKIP_TESTS=1 leaves out the kernel tests, SKIP_FULL=1 the full step bench. Outputs
# under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
ab_start
same_tokens "new vs base" "$L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "sd --tree naive_extend_57" "lantern++ --tree naive_extend_57" "lantern" 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
for r in $(seq 1 ${ROUNDS:-3}); do
  for bin in "$B" "$L"; do
    echo "== round $r $(basename $bin)"
    timeout 200 "$bin" bench --random-weights --preset t2i-xl-256 --device cuda --loop-only --loop-images 2 --loop-tokens 64 2>&1 | grep -E "^\| (ar|sd|lantern)|rror"
  done
done 2>&1 | tee "$OUT/loop_rounds.txt"
echo "loop rounds done ${SECONDS}s"
for m in sd-static lantern++-static; do
  LANTERN_LOOP_PROFILE=1 timeout 200 "$L" bench --random-weights --preset t2i-xl-256 --device cuda \
    --loop-only --loop-modes $m --loop-images 1 --loop-tokens 64 > "$OUT/profile_${m/++/pp}.txt" 2>&1
  echo "== profile $m (second image)"; grep -A40 "^loop profile" "$OUT/profile_${m/++/pp}.txt" | awk '/^loop profile/{n++} n==2' | grep -E "^\||^loop" | grep -v "^|---"
done
echo "profiles done ${SECONDS}s"
for p in $([ "${SKIP_FULL:-0}" = 1 ] || echo t2i-xl-256 c2i-xl-384); do
  timeout 240 "$L" bench --random-weights --preset $p --device cuda --loop-images 2 --loop-tokens 64 > "$OUT/full_$p.txt" 2>&1
  echo "== full $p"; grep -E "cuda graph\) \||drafting phase|^\| (ar|sd|lantern|AR|SD|LANTERN|loop|verify|one-token|decode)|over the decode|overhead|^  [A-Z]|rror" "$OUT/full_$p.txt"
done
echo "total ${SECONDS}s"

#!/usr/bin/env bash
# GPU run (session 16): attention that skips a fixed-shape step's empty cache slots (the filled
# length read from the device, `KeyMask::Staged`) and the step bench at the loops' real cache
# capacities, against the carried base build ($G/lantern-base.xz): CUDA kernel tests, token
# files (LANTERN_LIVE_KEYS=0 must equal the base bit for bit; skipping changes only summation
# order), ROUNDS interleaved rounds of the step bench (base / new without skipping / new), then
# FULL: whole images of the loop bench (t2i-xl-256, 1 image of 256 tokens, and with FULL_C2I=1
# c2i-xl-384, 576 tokens; ar, sd-static, lantern++-static) for the same three variants; REPORT=1
# adds the new binary's full step bench of both presets. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
ab_start
if [ "${SKIP_TOKENS:-0}" != 1 ]; then
  same_tokens "new (LANTERN_LIVE_KEYS=0) vs base" "env LANTERN_LIVE_KEYS=0 $L" "$B" "ar --temperature 0" "ar" "sd --tree naive_extend_57" "lantern"
  same_tokens "new vs base" "$L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "sd --tree naive_extend_57" "lantern++ --tree naive_extend_57" "lantern"
fi 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
RE="tok.*cuda graph\) \||drafting phase|over the decode|rror|panicked"
V=${VARIANTS:-BASE LANTERN_LIVE_KEYS=0 X=0}
ROUNDS=${ROUNDS:-2} PRESETS=t2i-xl-256 LOOP=0 VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_t2i.txt"
echo "t2i done ${SECONDS}s"
[ "${SKIP_C2I:-0}" = 1 ] || ROUNDS=1 PRESETS=c2i-xl-384 LOOP=0 VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/steps_c2i.txt"
echo "c2i done ${SECONDS}s"
# whole images: t2i (256 tokens) and, with FULL_C2I=1, c2i-xl-384 (576 tokens)
[ "${FULL:-1}" = 1 ] && full_images $V
[ "${REPORT:-0}" = 1 ] && step_reports
echo "total ${SECONDS}s"

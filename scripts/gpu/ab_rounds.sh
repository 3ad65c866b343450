#!/usr/bin/env bash
# GPU run (session 6): base vs new binary interleaved over ROUNDS rounds (default 3) per preset
# (PRESETS, default c2i-xl-384 t2i-xl-256), loop rows only: drift of the shared machine shows
# up in both binaries' rows instead of in the difference.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
for p in ${PRESETS:-c2i-xl-384 t2i-xl-256}; do
  for r in $(seq 1 ${ROUNDS:-3}); do
    for bin in "$B" "$L"; do
      echo "== round $r, $(basename $bin), $p"
      timeout 200 "$bin" bench --random-weights --preset $p --device cuda --loop-images 3 --loop-tokens ${TOKENS:-64} 2>&1 | grep -E "^\| (ar|sd|lantern) "
    done
  done
done 2>&1 | tee "$OUT/rounds.txt"
echo "total ${SECONDS}s"

#!/usr/bin/env bash
# GPU run (session 15): the decode step's launch settings on the H200 (tuned on an H100 in
# sessions 5-9): few-row kernel warps per block (LANTERN_SMALL_WARPS, forced for every
# projection; unset = 8 for wide outputs, 4 otherwise) and the one-kernel block
# (LANTERN_DECODE_LAYER=1), ROUNDS interleaved rounds of the t2i step bench. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i error | head -3
RE="tok.*cuda graph\) \||^\| small|over the decode|rror|panicked"
V=${VARIANTS:-X=0 LANTERN_SMALL_WARPS=2 LANTERN_SMALL_WARPS=4 LANTERN_SMALL_WARPS=8 LANTERN_SMALL_WARPS=16 LANTERN_DECODE_LAYER=1}
ROUNDS=${ROUNDS:-2} PRESETS=t2i-xl-256 LOOP=0 VARIANTS="$V" variant_rounds "$RE" 2>&1 | tee "$OUT/decode_variants.txt"
echo "total ${SECONDS}s"

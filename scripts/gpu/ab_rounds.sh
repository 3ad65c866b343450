#!/usr/bin/env bash
# GPU run (session 6): base vs new binary interleaved over ROUNDS rounds (default 3) per preset
# (PRESETS, default c2i-xl-384 t2i-xl-256), loop rows only: drift of the shared machine shows
# up in both binaries' rows instead of in the difference. CHECKS=1 adds the kernel test, token
# checks (new vs base, graphs vs none) and the shipped model's bench of both binaries.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
for p in ${PRESETS:-c2i-xl-384 t2i-xl-256}; do
  for r in $(seq 1 ${ROUNDS:-3}); do
    for bin in "$B" "$L"; do
      echo "== round $r, $(basename $bin), $p"
      timeout 200 "$bin" bench --random-weights --preset $p --device cuda --loop-images 3 --loop-tokens ${TOKENS:-64} 2>&1 | grep -E "^\| (ar|sd |lantern)"
    done
  done
done 2>&1 | tee "$OUT/rounds.txt"
if [ -n "${CHECKS:-}" ]; then
  LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "test result|panicked"
  same_tokens "new vs base binary" "$L" "$B" "sd --tree naive_extend_57 --temperature 0" "lantern++ --tree naive_extend_57" "lantern --tree dynamic"
  same_tokens "graphs vs none" "$L" "env LANTERN_CUDA_GRAPHS=0 $L" "sd --tree naive_extend_57 --temperature 0" "lantern++ --tree naive_extend_57"
  M="ar,sd-static,lantern++-2"
  for bin in "$B" "$L"; do echo "== shipped, $(basename $bin)"; timeout 150 "$bin" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | grep -E "^\| (ar|sd|lantern)"; done
fi
echo "total ${SECONDS}s"

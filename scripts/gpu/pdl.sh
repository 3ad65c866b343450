#!/usr/bin/env bash
# GPU run (session 4): programmatic dependent launch of our kernels and cudarc's event
# tracking. The same binary with LANTERN_PDL=0 / 1 and LANTERN_EVENT_TRACKING=1 / 0 (plain
# launches with tracking = session 3's behaviour), back to back; plus the
# CUDA-vs-CPU kernel test and the token checks (graphs vs none, PDL vs plain). Tables under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
"$L" bench --random-weights --preset tiny --device cuda 2>&1 | grep -i "error" | head -5 | tee "$OUT/tiny_errors.txt"
echo "warm-up done ${SECONDS}s"
LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt "$G/fused_forward" --nocapture 2>&1 | grep -E "rel err|test result|panicked" | tee "$OUT/kernel_test.txt"
# two variants: plain launches with cudarc's event tracking (session 3's behaviour) and the
# default (PDL, no tracking); VARIANTS overrides them: space-separated, one VAR=value each
for p in ${PRESETS:-t2i-xl-256 c2i-xl-384}; do
  for v in ${VARIANTS:-"LANTERN_PDL=0 LANTERN_EVENT_TRACKING=1" "LANTERN_PDL=1 LANTERN_EVENT_TRACKING=0"}; do
    echo "== $v, $p"; env $v timeout 100 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -60
  done
done 2>&1 | tee "$OUT/steps.txt"
echo "steps done ${SECONDS}s"
LANTERN_GRAPH_DEBUG=1 "$L" generate --class 0 -n 1 --device cuda --decoding lantern++ --tree naive_extend_57 --out /tmp/dbg --force 2>&1 | grep "\[graph\]" | sort | uniq -c | head -8 | tee "$OUT/graph_edges.txt"
source scripts/gpu/check_tokens.sh 2>&1 | tee "$OUT/equal.txt"
same_tokens "with vs without PDL" "$L" "env LANTERN_PDL=0 $L" "ar --temperature 0" "sd --tree dynamic --temperature 0" "lantern++ --tree naive_extend_57" 2>&1 | tee -a "$OUT/equal.txt"
if [ -n "${SHIPPED:-}" ]; then
  M="ar,sd-static,lantern++-2"
  { echo "== LANTERN_PDL=0"; LANTERN_PDL=0 timeout 150 "$L" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -12
    echo "== PDL"; timeout 150 "$L" bench --data "$G/data" -n 4 --modes $M --device cuda 2>&1 | tail -22
  } 2>&1 | tee "$OUT/bench.txt"
fi
echo "total ${SECONDS}s"

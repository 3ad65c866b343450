#!/usr/bin/env bash
# GPU run (session 2): fused RMSNorm/RoPE and the CUDA-graph decode step against the previous
# binary (.gpu/lantern-old), on the same machine in the same run. Tables under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
export LANTERN_GRAPH_DEBUG=1
xz -dkf "$G/lantern-old.xz" && chmod +x "$G/lantern-old"
O="$G/lantern-old"
SECONDS=0
# JIT warm-up of both binaries' kernels (not timed)
"$L" bench --random-weights --preset tiny --device cuda 2>&1 | grep -i "graph\|error" | head -12
"$O" bench --random-weights --preset tiny --device cuda > /dev/null 2>&1
echo "warm-up done ${SECONDS}s"
for p in t2i-xl-256 c2i-xl-384; do
  echo "== previous binary, $p"; timeout 150 "$O" bench --random-weights --preset $p --device cuda 2>&1 | tail -14
  echo "== this commit, $p"; timeout 150 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -16
done 2>&1 | tee "$OUT/steps.txt"
# greedy AR tokens: graph replay == ordinary forward
"$L" generate --class 0,7 -n 2 --decoding ar --temperature 0 --device cuda --out /tmp/g1 --save-tokens /tmp/g1.json 2>&1 | grep -i "error" | head -5
LANTERN_CUDA_GRAPHS=0 "$L" generate --class 0,7 -n 2 --decoding ar --temperature 0 --device cuda --out /tmp/g0 --save-tokens /tmp/g0.json > /dev/null 2>&1
if cmp -s /tmp/g1.json /tmp/g0.json; then echo "greedy AR tokens graph == no graph: IDENTICAL"; else echo "greedy AR tokens graph vs no graph: DIFFER"; fi | tee "$OUT/equal.txt"
# shipped model, same classes and seeds: previous binary, this commit without and with graphs
M="ar,sd-static,lantern++-2"
{
echo "== previous binary"; timeout 200 "$O" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -6
echo "== this commit, LANTERN_CUDA_GRAPHS=0"; LANTERN_CUDA_GRAPHS=0 timeout 200 "$L" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -6
echo "== this commit"; timeout 200 "$L" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -6
} | tee "$OUT/bench.txt"
echo "total ${SECONDS}s"

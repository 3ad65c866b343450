#!/usr/bin/env bash
# GPU run (session 2): fused RMSNorm/RoPE, whole-model KV tensors and CUDA-graph steps
# (decode, tree verification, drafter) against the previous binary (.gpu/lantern-old), on the
# same machine in the same run. Tables under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
xz -dkf "$G/lantern-old.xz" && chmod +x "$G/lantern-old"
O="$G/lantern-old"
SECONDS=0
# JIT warm-up of both binaries' kernels (not timed)
"$L" bench --random-weights --preset tiny --device cuda 2>&1 | grep -i "error" | head -5
"$O" bench --random-weights --preset tiny --device cuda > /dev/null 2>&1
echo "warm-up done ${SECONDS}s"
for p in t2i-xl-256 c2i-xl-384; do
  echo "== previous binary, $p"; timeout 100 "$O" bench --random-weights --preset $p --device cuda 2>&1 | tail -14
  echo "== this commit, $p"; timeout 100 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -17
done 2>&1 | tee "$OUT/steps.txt"
# graph replay == ordinary forward: greedy AR, greedy SD (static, dynamic), sampled LANTERN++
source scripts/gpu/check_tokens.sh 2>&1 | tee "$OUT/equal.txt"
M="ar,sd-static,sd-dynamic,lantern++-2,lantern-0.2"
{
echo "== previous binary"; timeout 150 "$O" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -8
echo "== this commit, LANTERN_CUDA_GRAPHS=0"; LANTERN_CUDA_GRAPHS=0 timeout 150 "$L" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -22
echo "== this commit"; timeout 150 "$L" bench --data "$G/data" -n 2 --modes $M --device cuda 2>&1 | tail -22
} 2>&1 | tee "$OUT/bench.txt"
echo "total ${SECONDS}s"

set -uo pipefail
source scripts/gpu/env.sh
"$L" bench --random-weights --preset tiny --device cuda 2>&1 | grep -i "error" | head -5
LANTERN_GRAPH_DEBUG=1 "$L" generate --class 0 -n 1 --device cuda --decoding lantern++ --tree naive_extend_57 --out /tmp/dbg --force 2>&1 | grep "\[graph\]" | sort | uniq -c | sort -rn | head -12
for v in "LANTERN_PDL=0" "LANTERN_PDL=1" "LANTERN_PDL=0" "LANTERN_PDL=1"; do
  echo "== $v"; env $v timeout 100 "$L" bench --random-weights --preset t2i-xl-256 --device cuda 2>&1 | grep -E "decode 1 tok|verify 59|drafter 10|small|attention|rope" | grep -v matmul
done

#!/usr/bin/env bash
# GPU quick check (session 4): t2i-xl-256 step timings with LANTERN_PDL=0 / 1 alternating
# (same binary, same machine), then the token checks (graphs vs none, PDL vs plain launches).
set -uo pipefail
source scripts/gpu/env.sh
"$L" bench --random-weights --preset tiny --device cuda 2>&1 | grep -i "error" | head -5
for v in "LANTERN_PDL=0" "LANTERN_PDL=1" "LANTERN_PDL=0" "LANTERN_PDL=1"; do
  echo "== $v"; env $v timeout 100 "$L" bench --random-weights --preset t2i-xl-256 --device cuda 2>&1 | grep -E "decode 1 tok|verify 59|drafter 10|small|attention|rope|error|Error" | grep -v matmul
done
source scripts/gpu/check_tokens.sh 2>&1
for d in "ar --temperature 0" "sd --tree dynamic --temperature 0" "lantern++ --tree naive_extend_57"; do
  args="--class 0,7 -n 2 --device cuda --seed 3 --decoding $d"
  "$L" generate $args --out /tmp/p1 --save-tokens /tmp/p1.json --force 2>&1 | grep -i error | head -3
  LANTERN_PDL=0 "$L" generate $args --out /tmp/p0 --save-tokens /tmp/p0.json --force 2>&1 | grep -i error | head -3
  if cmp -s /tmp/p1.json /tmp/p0.json; then r=IDENTICAL; else r=DIFFER; fi
  echo "tokens with vs without PDL, --decoding $d: $r"
done

#!/usr/bin/env bash
# Sourced by GPU scripts: generates the same images with and without CUDA graphs ($L, env.sh
# loaded) for greedy AR, greedy SD (static and dynamic tree) and sampled LANTERN++, and prints
# whether the token files are identical.
for d in "ar --temperature 0" "sd --tree naive_extend_57 --temperature 0" "sd --tree dynamic --temperature 0" "lantern++ --tree naive_extend_57"; do
  args="--class 0,7 -n 2 --device cuda --seed 3 --decoding $d"
  "$L" generate $args --out /tmp/g1 --save-tokens /tmp/g1.json --force 2>&1 | grep -i error | head -3
  LANTERN_CUDA_GRAPHS=0 "$L" generate $args --out /tmp/g0 --save-tokens /tmp/g0.json --force 2>&1 | grep -i error | head -3
  if cmp -s /tmp/g1.json /tmp/g0.json; then r=IDENTICAL; else r=DIFFER; fi
  echo "tokens with vs without graphs, --decoding $d: $r"
done

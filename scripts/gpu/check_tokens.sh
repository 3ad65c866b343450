#!/usr/bin/env bash
# Sourced by GPU scripts (after env.sh): generates the same images with and without CUDA
# graphs for greedy AR, greedy SD (static and dynamic tree) and sampled LANTERN++, and prints
# whether the token files are identical.
same_tokens "with vs without graphs" "$L" "env LANTERN_CUDA_GRAPHS=0 $L" \
  "ar --temperature 0" "sd --tree naive_extend_57 --temperature 0" \
  "sd --tree dynamic --temperature 0" "lantern++ --tree naive_extend_57"

#!/usr/bin/env bash
# GPU run (sessions 18-20): EAGLE-2's dynamic trees drafted in one CUDA graph per step
# (decode/dynamic_graph.rs, the default; LANTERN_DYNAMIC_GRAPH=0 drafts them level by level, the
# host choosing each frontier; session 19: the trees chosen and their verification inputs
# written on the device, and verification's block left at its staging slots for the
# compaction, LANTERN_DEFER_COMMIT=0 committing it first; session 20: the drafter feed folded into
# the drafting graphs, LANTERN_FOLD_FEED=0 feeding on its own; TOKEN_SET picks the token checks:
# fold, the default, or session19) against the level-by-level path of the same binary and against
# the carried base binary (BASE). The library's CUDA tests (the frontier and select-tree kernels and the picks
# against the CPU; KERNEL_TESTS=1 adds the carried kernel test binary's); token files; ROUNDS rounds of the loop bench (t2i;
# c2i once) over VARIANTS; with PROFILE=1 the loop profile of SD dynamic (PROFILE_MODES) per variant; with
# FULL=1 whole t2i images of SD dynamic (FULL_MODES) per variant; with REPORT=1 the full step reports;
# PIN=CPUS runs the loop benches under `taskset -c CPUS` (the loop is host-bound: one core for
# every variant). Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
[ "${KERNEL_TESTS:-0}" = 1 ] && kernel_tests
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  xz -dkf "$G/lantern_lib.xz" && chmod +x "$G/lantern_lib"
  timeout 240 "$G/lantern_lib" --nocapture cuda_ 2>&1 | grep -E "^test |test result|panicked" | tee "$OUT/lib_tests.txt"
fi
echo "lib tests done ${SECONDS}s"
if [ "${SKIP_TOKENS:-0}" != 1 ]; then
  D="--tree dynamic"; S="--tree naive_extend_57"
  case ${TOKEN_SET:-fold} in
    fold)  # session 20: the drafter feed folded into the drafting graph
      same_tokens "folded vs own feed" "$L" "env LANTERN_FOLD_FEED=0 $L" "sd $D --temperature 0" "sd $D" "lantern $D" \
        "lantern++ $S" "sd $S --temperature 0" "lantern++ $S --dtype bf16" "lantern $D --dtype bf16"
      same_tokens "own feed vs base" "env LANTERN_FOLD_FEED=0 $L" "$B" "sd $D" "lantern $D" "lantern++ $S" ;;
    *)  # session 19
      same_tokens "dynamic graph vs level by level" "$L" "env LANTERN_DYNAMIC_GRAPH=0 $L" "sd $D --temperature 0" "sd $D" "lantern $D" "lantern $D --dtype bf16"
      same_tokens "deferred vs committed verification block" "$L" "env LANTERN_DEFER_COMMIT=0 $L" "sd $D" "lantern++ $S --dtype bf16" "lantern $D --dtype bf16" ;;
  esac
  same_tokens "new vs base" "$L" "$B" "sd $D" "lantern $D" "ar" "lantern++ $S" "sd $S --temperature 0"
  greedy_equal "greedy sd dynamic = greedy ar" "$L" "ar --temperature 0" "sd $D --temperature 0"
  greedy_equal "greedy sd static = greedy ar" "$L" "ar --temperature 0" "sd $S --temperature 0"
fi 2>&1 | tee "$OUT/checks.txt"
echo "tokens done ${SECONDS}s"
V=${VARIANTS:-BASE X=0 LANTERN_DYNAMIC_GRAPH=0}
loop_rounds() {
  local r p e bin envs
  for r in $(seq 1 $1); do
    for e in $V; do
      variant "$e"
      echo "== round $r $2 $(basename $bin) $envs"
      env $envs timeout 200 ${PIN:+taskset -c $PIN} "$bin" bench --random-weights --preset $2 --device cuda --loop-only \
        --loop-modes ${MODES:-sd-dynamic,sd-static} --loop-images 2 --loop-tokens 64 2>&1 | grep -iE "^\| (ar|sd|lantern)|rror"
    done
  done
}
loop_rounds ${ROUNDS:-2} t2i-xl-256 2>&1 | tee "$OUT/loop_t2i.txt"
echo "t2i done ${SECONDS}s"
[ "${SKIP_C2I:-0}" = 1 ] || loop_rounds 1 c2i-xl-384 2>&1 | tee "$OUT/loop_c2i.txt"
echo "c2i done ${SECONDS}s"
if [ "${PROFILE:-0}" = 1 ]; then
  for e in ${PROFILE_VARIANTS:-X=0 LANTERN_DYNAMIC_GRAPH=0}; do
    variant "$e"
    echo "== profile ${PROFILE_MODES:-sd-dynamic} $envs"
    env $envs LANTERN_LOOP_PROFILE=1 timeout 200 ${PIN:+taskset -c $PIN} "$bin" bench --random-weights --preset t2i-xl-256 --device cuda \
      --loop-only --loop-modes ${PROFILE_MODES:-sd-dynamic} --loop-images 2 --loop-tokens 64 > "$OUT/profile_${e%%=*}.txt" 2>&1
    tail -40 "$OUT/profile_${e%%=*}.txt"
  done
fi
if [ "${FULL:-0}" = 1 ]; then
  # whole t2i images (1 image of 256 tokens) per variant, SD dynamic
  for e in $V; do
    variant "$e"
    echo "== full image t2i-xl-256 $(basename $bin) $envs"
    env $envs timeout 200 ${PIN:+taskset -c $PIN} "$bin" bench --random-weights --preset t2i-xl-256 --device cuda --loop-only \
      --loop-modes ${FULL_MODES:-sd-dynamic} --loop-images 1 --loop-tokens 256 2>&1 | grep -iE "^\| (sd|lantern)|rror"
  done 2>&1 | tee "$OUT/full_images.txt"
fi
[ "${REPORT:-0}" = 1 ] && step_reports
echo "total ${SECONDS}s"

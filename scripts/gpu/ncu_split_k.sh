#!/usr/bin/env bash
# Nsight Compute over the split-K kernels (session 17): the CUDA test's first launches (wo at
# 118 rows, then w2 with SwiGLU), sections printed to $OUT/ncu.txt; with SASS=1 also the
# per-instruction source counters of the first split_k_linear launch ($OUT/sass.csv).
source scripts/gpu/env.sh
xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
NCU=${NCU:-/usr/local/cuda/bin/ncu}
export LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt
if [ "${SASS:-0}" = 1 ]; then
  timeout 300 $NCU --kernel-name regex:"split_k_linear" --launch-count 1 --section SourceCounters --section WarpStateStats \
    --page source --print-source sass --csv "$G/fused_forward" --nocapture cuda_split_k > $OUT/sass.csv 2>&1
  echo "sass rc $?"
fi
timeout 400 $NCU --kernel-name regex:"split_k_|add_norm_parts" --launch-count ${COUNT:-8} --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section MemoryWorkloadAnalysis "$G/fused_forward" --nocapture cuda_split_k > $OUT/ncu.txt 2>&1
echo "rc $?"
grep -E "split_k_|add_norm_parts|Duration|Achieved Occupancy|Warp Cycles Per Issued" $OUT/ncu.txt | head -60

#!/usr/bin/env bash
# GPU run (session 11): the drafting-pick kernels (probabilities with the row in registers,
# draws with per-chunk masses and a shuffle scan) against the carried base binary: the picks'
# CUDA-vs-CPU test (carried library test binary $G/lantern_lib.xz) and every CUDA kernel test,
# token files new vs base, the step bench's drafting / verify / decode rows and the loop split
# (ROUNDS rounds over PRESETS, the binaries interleaved), then Nsight Compute over the pick
# kernels of a few SD-static loop steps of each binary. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
with_base
xz -dkf "$G/lantern_lib.xz" && chmod +x "$G/lantern_lib"
timeout 120 "$G/lantern_lib" --nocapture cuda_picks 2>&1 | grep -E "^test |test result|panicked" | tee "$OUT/picks_test.txt"
kernel_tests
echo "tests done ${SECONDS}s"
{
same_tokens "new vs base" "$L" "$B" "ar --temperature 0" "ar" "sd --temperature 0" "sd --tree naive_extend_57" "lantern++ --tree naive_extend_57" "lantern"
} 2>&1 | tee "$OUT/checks.txt"
ROUNDS=${ROUNDS:-3} LOOP=${LOOP:-2} VARIANTS=${VARIANTS:-BASE X=0} \
  variant_rounds "tok.*cuda graph\) \||drafting phase|^\| (sd|lantern)|over the decode|rror|panicked" 2>&1 | tee "$OUT/steps.txt"
NCU=${NCU:-/usr/local/cuda/bin/ncu}
for bin in "$B" "$L"; do
  timeout 120 "$NCU" --metrics gpu__time_duration.sum --csv --page raw --kernel-name regex:draft_ \
    "$bin" bench --random-weights --preset t2i-xl-256 --device cuda --loop-only --loop-modes sd-static \
    --loop-images 1 --loop-tokens 6 > "$OUT/ncu_$(basename $bin).csv" 2> /dev/null
  echo "== ncu $(basename $bin) rc $?"
  python3 - "$OUT/ncu_$(basename $bin).csv" <<'PY'
import csv, sys, statistics, collections
rows = list(csv.reader(open(sys.argv[1])))
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None: print("no kernel rows"); sys.exit()
h = rows[hdr]; kn, t, g = h.index("Kernel Name"), h.index("gpu__time_duration.sum"), h.index("Grid Size")
by = collections.defaultdict(list)
for r in rows[hdr + 2:]:
    try: by[(r[kn], r[g])].append(float(r[t].replace(",", "")) / 1e3)
    except (ValueError, IndexError): pass
for (name, grid), v in sorted(by.items()):
    print(f"{name:18s} grid {grid:12s} {len(v):4d} x median {statistics.median(v):8.2f} us  min {min(v):8.2f}")
PY
done
echo "total ${SECONDS}s"

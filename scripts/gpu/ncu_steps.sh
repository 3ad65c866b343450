#!/usr/bin/env bash
# GPU run (session 6): per-kernel durations of the step bench (t2i-xl-256, no loop) under Nsight
# Compute (`ncu`, found on the lent machines at /usr/local/cuda/bin), kernels serialised: the
# CSV goes to $OUT/ncu.csv; the summary groups kernels by name (count, median and min µs).
# SKIP and COUNT choose the launches profiled (default: the first 12,000).
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 0 2>&1 | grep -i error | head -3
NCU=${NCU:-/usr/local/cuda/bin/ncu}
timeout 500 "$NCU" --metrics gpu__time_duration.sum --csv --page raw -s ${SKIP:-0} -c ${COUNT:-12000} \
  "$L" bench --random-weights --preset ${PRESET:-t2i-xl-256} --device cuda --loop-images 0 \
  > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu rc $? after ${SECONDS}s; $(wc -l < "$OUT/ncu.csv") lines"; tail -3 "$OUT/ncu.err"
python3 - "$OUT/ncu.csv" <<'PY'
import csv, sys, statistics, collections
rows = list(csv.reader(open(sys.argv[1])))
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None:
    print("no kernel rows"); print("\n".join(",".join(r) for r in rows[:20])); sys.exit()
h = rows[hdr]; kn = h.index("Kernel Name"); tcol = h.index("gpu__time_duration.sum")
by = collections.defaultdict(list)
for r in rows[hdr + 2:]:
    try: by[r[kn][:90]].append(float(r[tcol].replace(",", "")))
    except (ValueError, IndexError): pass
unit = rows[hdr + 1][tcol]
print(f"{len(by)} kernels, unit {unit}")
for name, t in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:45]:
    print(f"{len(t):6d} x  median {statistics.median(t):10.2f}  min {min(t):10.2f}  {name}")
PY
echo "total ${SECONDS}s"

#!/usr/bin/env bash
# GPU run (session 7): Nsight Compute on the attention kernels of the step bench (t2i-xl-256):
# duration, occupancy and the warp stall reasons (cycles per issued instruction) of the
# key-split kernel (59 queries) and the one-query kernel (KERNELS, a regex, picks them; EXTRA
# adds metrics, e.g. for the decode-layer kernel of session 8; run 16
# of docs/BENCHMARKS.md also profiled the since removed shared-memory tensor-core kernel).
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 0 2>&1 | grep -i error | head -3
NCU=${NCU:-/usr/local/cuda/bin/ncu}
i=0
for e in ${VARIANTS:-X=0}; do
  i=$((i+1)); echo "== $e"
  env $e timeout 200 "$NCU" -k "regex:${KERNELS:-attention_tc_64_8|attention_64_1}" -c ${COUNT:-3} --csv --page raw \
    --metrics gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__average_warp_latency_per_inst_issued.ratio${EXTRA:+,$EXTRA} \
    "$L" bench --random-weights --preset ${PRESET:-t2i-xl-256} --device cuda --loop-images 0 > "$OUT/ncu$i.csv" 2> "$OUT/ncu$i.err"
  python3 - "$OUT/ncu$i.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None: print("no rows"); sys.exit()
h = rows[hdr]
for r in rows[hdr + 2:]:
    print(r[h.index("Kernel Name")])
    vals = []
    for k, v in zip(h, r):
        if k.startswith(("gpu__", "sm__", "launch__", "smsp__")):
            try: x = float(v.replace(",", ""))
            except ValueError: continue
            if x >= 0.05: vals.append((x, k.replace("smsp__average_warps_issue_stalled_", "stall_").replace("_per_issue_active.ratio", "")))
    for x, k in sorted(vals, reverse=True): print(f"   {x:10.2f}  {k}")
PY
done
echo "total ${SECONDS}s"

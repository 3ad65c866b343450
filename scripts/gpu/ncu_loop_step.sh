#!/usr/bin/env bash
# GPU run (session 20): every kernel of the speculative loop's steps under Nsight Compute, in
# launch order (`ncu` serialises kernels and runs them at base clocks: durations are above the
# in-graph ones; the count and order are what this is for). MODE (default sd-static) at
# t2i-xl-256, 1 image of TOKENS (default 8) tokens; SKIP launches are skipped (the prefill, the
# warm-up and the captures). Prints the launches per kernel name and the last LAST (default 400)
# launches in order (of the first COUNT, default 8000); keeps the CSV as $OUT/ncu_loop_MODE.csv.
set -uo pipefail
source scripts/gpu/env.sh
SECONDS=0
"$L" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i error | head -3
NCU=${NCU:-/usr/local/cuda/bin/ncu}
M=${MODE:-sd-static}
timeout ${NCU_TIMEOUT:-500} "$NCU" --metrics gpu__time_duration.sum --csv --page raw -s ${SKIP:-0} -c ${COUNT:-8000} \
  "$L" bench --random-weights --preset t2i-xl-256 --device cuda --loop-only --loop-modes $M \
  --loop-images 1 --loop-tokens ${TOKENS:-8} > "$OUT/ncu_loop_$M.csv" 2> "$OUT/ncu_loop_$M.err"
echo "ncu rc $? after ${SECONDS}s; $(wc -l < "$OUT/ncu_loop_$M.csv") lines"; tail -3 "$OUT/ncu_loop_$M.err"
python3 - "$OUT/ncu_loop_$M.csv" ${LAST:-400} <<'PY'
import csv, sys, collections
rows = list(csv.reader(open(sys.argv[1])))
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None:
    print("no kernel rows"); sys.exit()
h = rows[hdr]; kn = h.index("Kernel Name"); t = h.index("gpu__time_duration.sum")
g = h.index("Grid Size") if "Grid Size" in h else None
ks = []
for r in rows[hdr + 2:]:
    try: ks.append((r[kn][:70], r[g] if g is not None else "", float(r[t].replace(",", "")) / 1e3))
    except (ValueError, IndexError): pass
print(f"{len(ks)} launches; unit us")
by = collections.Counter(k[0] for k in ks)
tot = collections.defaultdict(float)
for k in ks: tot[k[0]] += k[2]
for name, n in by.most_common(60):
    print(f"{n:6d} x {tot[name] / n:8.2f} us  {name}")
print("== last launches in order")
for name, grid, us in ks[-int(sys.argv[2]):]:
    print(f"{us:8.2f}  {grid:14s} {name}")
PY
echo "total ${SECONDS}s"

source scripts/gpu/env.sh
export RUST_BACKTRACE=1 LANTERN_GRAPH_DEBUG=1
for m in relaxed thread global; do for af in 1 0; do
echo "=== mode $m autofree $af"
LANTERN_GRAPH_MODE=$m LANTERN_GRAPH_AUTOFREE=$af timeout 60 "$L" bench --random-weights --preset tiny --device cuda > /tmp/o.txt 2>&1; echo "rc $?"
grep -v "^ *[0-9]*: \|^ *at " /tmp/o.txt | head -30
done; done 2>&1 | tee $OUT/dbg.txt | head -150

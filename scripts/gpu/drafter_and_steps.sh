#!/usr/bin/env bash
# GPU run 3: drafter (distill + train) for the bundle in $G/bundle, then per-step timings of
# GPT-XL shapes with random weights, then a short bench of the shipped model. Outputs under $OUT.
set -uo pipefail
source scripts/gpu/env.sh
B=$G/bundle
mkdir -p "$OUT/drafter"
SECONDS=0
"$L" tokenize --vq "$B/vq" --data "$G/data" --split train --out /tmp/train.tok --device cuda --force
"$L" distill --gpt "$B/gpt" --tokens /tmp/train.tok --out /tmp/distill --max-sequences 24000 --chunk-size 1000 --device cuda 2>&1 | tail -1 | tee "$OUT/log.txt"
"$L" train drafter --gpt "$B/gpt" --data /tmp/distill --out /tmp/drafter --steps "${DSTEPS:-4000}" --batch-size 32 --lr 1e-3 --ckpt-every 500 --time-limit-s "${DLIMIT:-240}" --device cuda 2>&1 | tail -12 | tee -a "$OUT/log.txt"
cp /tmp/drafter/config.json /tmp/drafter/model.safetensors /tmp/drafter/losses.csv "$OUT/drafter/"
echo "drafter done at ${SECONDS}s" | tee -a "$OUT/log.txt"
for p in t2i-xl-256 c2i-xl-384; do
  timeout 120 "$L" bench --random-weights --preset $p --device cuda 2>&1 | tail -16 | tee -a "$OUT/steps.txt"
done
cp -r /tmp/drafter "$B/drafter"
"$L" neighbors --vq "$B/vq" --k 200 --out "$B/neighbors.safetensors" | tee -a "$OUT/log.txt"
timeout $(( 540 - SECONDS )) "$L" bench --models "$B" -n 2 --k 100 --modes ar,sd-dynamic,sd-static,lantern-0.1,lantern-0.2,lantern-0.4,lantern++-3 --device cuda 2>&1 | tail -20 | tee "$OUT/bench.txt"
echo "total ${SECONDS}s" | tee -a "$OUT/log.txt"

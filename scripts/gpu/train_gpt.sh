#!/usr/bin/env bash
# GPU run 2: tokenize Fashion-MNIST with the trained VQ ($VQ) and train the GPT target for at
# most $LIMIT seconds. Outputs (f16 export, losses) under $OUT.
set -euo pipefail
source scripts/gpu/env.sh
VQ=${VQ:-$G/vq}
LIMIT=${LIMIT:-480}
"$L" tokenize --vq "$VQ" --data "$G/data" --split train --out /tmp/train.tok --device cuda
"$L" tokenize --vq "$VQ" --data "$G/data" --split test --out /tmp/test.tok --device cuda
mkdir -p "$OUT/gpt"
"$L" train gpt --tokens /tmp/train.tok --test-tokens /tmp/test.tok --out /tmp/gpt \
  --dim "${DIM:-256}" --layers "${LAYERS:-8}" --heads "${HEADS:-8}" --steps "${STEPS:-20000}" \
  --batch-size "${BATCH:-64}" --lr "${LR:-6e-4}" --warmup 300 --ckpt-every "${CKPT:-500}" \
  --time-limit-s "$LIMIT" --device cuda 2>&1 | tail -60 | tee "$OUT/log.txt"
cp /tmp/gpt/export/config.json /tmp/gpt/export/model.safetensors /tmp/gpt/losses.csv "$OUT/gpt/"

#!/usr/bin/env bash
# GPU run 1: train the Fashion-MNIST VQ tokenizer and check tokenization. Outputs under $OUT.
set -euo pipefail
source scripts/gpu/env.sh
STEPS=${STEPS:-3000}
mkdir -p "$OUT/vq" "$OUT/classifier"
"$L" train classifier --out /tmp/classifier --data "$G/data" --epochs 8 --device cuda | tee "$OUT/log-classifier.txt"
cp /tmp/classifier/config.json /tmp/classifier/model.safetensors "$OUT/classifier/"
"$L" train vq --out /tmp/vq --data "$G/data" --steps "$STEPS" --batch-size 128 --ckpt-every 1000 --device cuda 2>&1 | tail -40 | tee "$OUT/log.txt"
cp /tmp/vq/config.json /tmp/vq/model.safetensors /tmp/vq/losses.csv "$OUT/vq/"
cp "$(ls /tmp/vq/recon_*.png | sort -V | tail -1)" "$OUT/vq/recon.png"
"$L" tokenize --vq /tmp/vq --data "$G/data" --split test --out /tmp/test.tok --device cuda | tee -a "$OUT/log.txt"
# GPT step-time probe on the test tokens (sizes the step count of run 2)
SECONDS=0
"$L" train gpt --tokens /tmp/test.tok --test-tokens /tmp/test.tok --out /tmp/gpt-probe --steps 60 --batch-size 64 --ckpt-every 60 --device cuda 2>&1 | tail -5 | tee -a "$OUT/log.txt"
echo "gpt probe: 60 steps + 1 eval in ${SECONDS} s" | tee -a "$OUT/log.txt"

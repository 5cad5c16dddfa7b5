#!/usr/bin/env bash
# The AR-SFT arm of the replication study: the same data, LoRA, steps and two-stage schedule as
# diffcoder-0.5b (train/stage-1, train/stage-2), with the next-token objective instead of block
# diffusion. Usage:
#
#   bash runs/diffcoder_05b/train_ar_sft.sh SFT_DIR OUT
#
# SFT_DIR: `diffcoder data sft` output from data/train.jsonl.gz (see the model card). Writes OUT/stage-1
# and OUT/stage-2 (each resumable with --resume), copies their metrics to train/ar-sft/stage-N/, and
# leaves the merged model in OUT/stage-2/final for `evaluate.py --ar-sft`.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 SFT_DIR OUT" >&2; exit 2; }
sft=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
base=qwen2.5-coder-0.5b-instruct
common=(--config "$here/sft.toml" --objective ar --data "$sft" --init "$base")
# Each stage's flags are those the block-diffusion stage of the same number ran with (train/stage-N/run.json).
diffcoder train "${common[@]}" --out "$out/stage-1"
diffcoder train "${common[@]}" --out "$out/stage-2" --adapter "$out/stage-1/adapter" \
  --steps 100 --lr 1e-4 --min-lr 1e-5 --lr-warmup 3 --seed 1
for n in 1 2; do
  mkdir -p "$here/train/ar-sft/stage-$n"
  cp "$out/stage-$n/metrics.jsonl" "$out/stage-$n/run.json" "$here/train/ar-sft/stage-$n/"
done

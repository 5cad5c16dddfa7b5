#!/usr/bin/env bash
# The AR-SFT arm of the replication study: the same data, LoRA, steps and stages as
# diffcoder-0.5b (train/stage-N), with the next-token objective instead of block diffusion. Usage:
#
#   bash runs/diffcoder_05b/train_ar_sft.sh SFT_DIR SFT2_DIR SFT3_DIR OUT
#
# SFT_DIR, SFT2_DIR and SFT3_DIR: `diffcoder data sft` outputs from data/, data-2/ and
# data-3/train.jsonl.gz (see the model card). Writes OUT/stage-1..4 (a stage whose final/ exists
# is kept; an interrupted one continues with --resume), copies their metrics to
# train/ar-sft/stage-N/, and leaves the merged model in OUT/stage-4/final for `evaluate.py --ar-sft`.
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 SFT_DIR SFT2_DIR SFT3_DIR OUT" >&2; exit 2; }
sft=$1 sft2=$2 sft3=$3 out=$4
here=$(cd "$(dirname "$0")" && pwd)
base=qwen2.5-coder-0.5b-instruct
source "$here/train_lib.sh"

stage() {  # N DATA_DIR DATA_SET [flags]: one stage, from the previous stage's adapter when N > 1
  local n=$1 data=$2 set=$3
  shift 3
  local from=()
  [ "$n" -gt 1 ] && from=(--adapter "$out/stage-$((n - 1))/adapter")
  train_kept "$out/stage-$n" "$here/train/ar-sft/stage-$n" --config "$here/sft.toml" --objective ar \
    --data "$data" --init "$base" "${from[@]}" "$@"
  echo "{\"data_set\": \"$set\"}" > "$here/train/ar-sft/stage-$n/data.json"
}

# Each stage's flags are those the block-diffusion stage of the same number ran with (train/stage-N/run.json).
stage 1 "$sft" data
stage 2 "$sft" data --steps 100 --lr 1e-4 --min-lr 1e-5 --lr-warmup 3 --seed 1
stage 3 "$sft2" data-2 --steps 100 --lr 1e-4 --min-lr 1e-5 --lr-warmup 3 --seed 2
stage 4 "$sft3" data-3 --steps 100 --lr 1e-4 --min-lr 1e-5 --lr-warmup 3 --seed 3

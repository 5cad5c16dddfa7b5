#!/usr/bin/env bash
# One-setting ablations of diffcoder-0.5b's first stage: each arm is stage 1 (train/stage-1: the
# AR base, data set data/, sft.toml, seed 0) with one setting changed, at the same steps and
# tokens. Usage:
#
#   bash runs/diffcoder_05b/train_ablations.sh SFT_DIR OUT [ARM ...]
#
# SFT_DIR: `diffcoder data sft` output from data/train.jsonl.gz (see the model card). ARM is one
# of s1 (the reference: stage 1's own adapter, as shipped in the commit that first shipped it,
# merged into the base), full, noshift, nowarmup (default: all). Writes OUT/ARM/final (a merged
# model for `evaluate.py --ablations OUT`; an arm whose final/ exists is kept, an interrupted
# one continues with --resume) and copies each run's metrics to train/ablation/ARM/.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 SFT_DIR OUT [s1|full|noshift|nowarmup ...]" >&2; exit 2; }
sft=$1 out=$2
shift 2
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(s1 full noshift nowarmup)
here=$(cd "$(dirname "$0")" && pwd)
base=qwen2.5-coder-0.5b-instruct
source "$here/train_lib.sh"
stage1_commit=d87e049  # the commit that shipped stage 1's adapter (train/stage-1)

reference() {  # stage 1's adapter from git history, merged into the pulled base
  local run=$out/s1
  [ -f "$run/final/model.safetensors" ] && return
  mkdir -p "$run/adapter" "$run/final"
  for f in adapter_config.json adapter_model.safetensors generation_config.json result.json; do
    git -C "$here" show "$stage1_commit:diffcoder/weights/diffcoder-0.5b/$f" > "$run/adapter/$f"
  done
  python - "$base" "$run" <<'EOF'
import json, sys
from pathlib import Path
from diffcoder.hub import merge_into, resolve
base, run = resolve(sys.argv[1]), Path(sys.argv[2])
got, want = merge_into(base, run / "adapter", run / "final"), json.loads((run / "adapter/result.json").read_text())["sha256"]
if got != want:
    sys.exit(f"stage 1 merged to sha256 {got}, but it shipped as {want}")
print("stage 1 merged, sha256", got)
EOF
}

arm() {  # NAME [flags]: stage 1 with the flags changed
  local name=$1
  shift
  train_kept "$out/$name" "$here/train/ablation/$name" --config "$here/sft.toml" --data "$sft" --init "$base" \
    --seed 0 "$@"
}

for a in "${arms[@]}"; do
  case $a in
    s1) reference ;;
    # Full fine-tuning: every weight, at a tenth of the adapters' learning rate (the usual ratio).
    full) arm full --lora-rank 0 --lr 2e-5 --min-lr 2e-6 --save-every 25 ;;
    # The paper's choice: position i predicts token i (the AR base's head predicted i + 1).
    noshift) arm noshift --no-shift ;;
    # Full U(0, 1) noise and 1/u loss weights from the first step.
    nowarmup) arm nowarmup --no-warmup ;;
    *) echo "unknown arm: $a (s1, full, noshift or nowarmup)" >&2; exit 2 ;;
  esac
done

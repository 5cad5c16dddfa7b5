#!/usr/bin/env bash
# CPT ablations from the same AR checkpoint (run runs/tiny_pipeline.sh first, same SIZE/OUT):
# the recipe (warmup + clipped noise + fallback), no corruption warmup, and naive noise
# (no clipping, no forced mask). Curves overlaid in $OUT/ablation.png.
#
#   runs/cpt_ablation.sh            SIZE=gpu runs/cpt_ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-cpu}
OUT=${OUT:-runs/out/$SIZE}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DC=("$PY" -m diffcoder.cli)
if [ ! -f "$OUT/ar/final/config.json" ]; then
  echo "no $OUT/ar/final: run runs/tiny_pipeline.sh (same SIZE and OUT) first" >&2; exit 2
fi
run() {  # name, extra flags...
  local name=$1; shift
  "${DC[@]}" train --config "runs/configs/$SIZE-cpt.toml" --data "$OUT/data" --init "$OUT/ar/final" \
    --out "$OUT/ablation-$name" --resume --quiet "$@"
}
run recipe
run no-warmup --no-warmup
run naive-noise --no-warmup --no-clip --no-force-mask
"${DC[@]}" plot "$OUT/ablation-recipe" "$OUT/ablation-no-warmup" "$OUT/ablation-naive-noise" \
  --labels "warmup + clipped noise" "no warmup" "no warmup, unclipped, no fallback" --out "$OUT/ablation.png"

#!/usr/bin/env bash
# Trains diffcoder-tiny, the model that ships in diffcoder/weights/, with our own pipeline:
# code BPE -> AR pretraining (pre-annealing checkpoint) -> block-diffusion CPT (B = 4, warmup,
# clipped noise) -> SFT (random-EOS rule) -> export (bfloat16) + MODEL_CARD.md.
# Every stage resumes: rerun the script after an interruption and it goes on where it stopped.
#
#   runs/default_model.sh                  # OUT=runs/out/default (stage wall times: see MODEL_CARD.md)
#   STAGES="data ar" runs/default_model.sh # only some stages
#   EXPORT=0 runs/default_model.sh         # do not touch diffcoder/weights/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/out/default}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
STAGES=${STAGES:-"data ar cpt sft export"}
VOCAB=${VOCAB:-8192}
THREADS=${THREADS:-$(nproc)}
DC=("$PY" -m diffcoder.cli)
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
# The corpus: Python's standard library (PSF licence) and permissively licensed packages installed
# by `make setup` (licences listed in MODEL_CARD.md), plus Debian's Python examples when present.
SRC=("$STDLIB")
for pkg in numpy fastapi pydantic starlette jinja2 click httpx anyio rich _pytest; do
  [ -d "$SP/$pkg" ] && SRC+=("$SP/$pkg")
done
for d in /usr/share/doc/python3-yaml/examples; do [ -d "$d" ] && SRC+=("$d"); done
has() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
t0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - t0 ))s)" >&2; }
export OMP_NUM_THREADS=$THREADS

if has data; then
  if [ ! -f "$OUT/tokenizer/tokenizer.json" ]; then
    stage "tokenizer: byte-level BPE, vocab $VOCAB"
    "${DC[@]}" tokenizer train --src "${SRC[@]}" --ext py --vocab-size "$VOCAB" --out "$OUT/tokenizer" --quiet
  fi
  if [ ! -f "$OUT/data/manifest.json" ]; then
    stage "corpus: shards + manifest (2% of files held out)"
    "${DC[@]}" data build --src "${SRC[@]}" --ext py --tokenizer "$OUT/tokenizer" --out "$OUT/data" \
      --val-fraction 0.02 --quiet
  fi
  if [ ! -f "$OUT/sft-data/manifest.json" ]; then
    stage "SFT set: signature + docstring -> function (train split only)"
    "${DC[@]}" data sft-synth --data "$OUT/data" --out "$OUT/sft.jsonl" --max-samples 6000
    "${DC[@]}" data sft --src "$OUT/sft.jsonl" --tokenizer "$OUT/tokenizer" --out "$OUT/sft-data" --quiet
  fi
fi
train() {  # stage-dir, config, flags...
  local dir=$1 cfg=$2; shift 2
  [ -f "$OUT/$dir/final/config.json" ] && return 0
  stage "train $dir ($cfg)"
  "${DC[@]}" train --config "runs/configs/$cfg" --out "$OUT/$dir" --resume --quiet "$@"
}
has ar && train ar default-ar.toml --data "$OUT/data" --model-config runs/configs/model-default.json \
  --tokenizer "$OUT/tokenizer"
has cpt && train cpt default-cpt.toml --data "$OUT/data" --init "$OUT/ar/final"
has sft && train sft default-sft.toml --data "$OUT/sft-data" --init "$OUT/cpt/final"
if has export && [ "${EXPORT:-1}" = 1 ]; then
  stage "export: bfloat16 weights + model card -> diffcoder/weights/diffcoder-tiny"
  "$PY" runs/export_default.py --run "$OUT" --out diffcoder/weights/diffcoder-tiny
fi
stage "done"

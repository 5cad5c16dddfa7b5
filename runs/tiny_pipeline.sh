#!/usr/bin/env bash
# The whole recipe at toy scale: tokenizer -> corpus -> AR pretrain -> block-diffusion CPT -> SFT,
# then decode the results with `diffcoder generate`. Corpus: the running Python's standard library;
# SFT set: "signature + docstring -> function" from the corpus's train split (built offline).
#
#   runs/tiny_pipeline.sh                 # CPU smoke size (a few minutes on 2 cores)
#   SIZE=gpu runs/tiny_pipeline.sh        # bigger model and corpus (CUDA picked automatically)
#   OUT=/tmp/p PYTHON=.venv/bin/python runs/tiny_pipeline.sh
#   NPROC=2 runs/tiny_pipeline.sh         # data parallel under torchrun (gloo on CPU, NCCL on GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-cpu}
OUT=${OUT:-runs/out/$SIZE}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
NPROC=${NPROC:-1}
case "$SIZE" in
  cpu) MAX_FILES=${MAX_FILES:-300}; VOCAB=${VOCAB:-2048}; MODEL=runs/configs/model-tiny.json; SFT_N=400 ;;
  gpu) MAX_FILES=${MAX_FILES:-100000}; VOCAB=${VOCAB:-8192}; MODEL=runs/configs/model-small.json; SFT_N=5000 ;;
  *) echo "SIZE must be cpu or gpu" >&2; exit 2 ;;
esac
DC=("$PY" -m diffcoder.cli)
if [ "$NPROC" -gt 1 ]; then TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m diffcoder.cli)
else TRAIN=("${DC[@]}"); fi
STDLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p "$OUT"
t0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - t0 ))s)" >&2; }

stage "tokenizer: byte-level BPE, vocab $VOCAB, first $MAX_FILES stdlib files"
"${DC[@]}" tokenizer train --src "$STDLIB" --ext py --max-files "$MAX_FILES" --vocab-size "$VOCAB" \
  --out "$OUT/tokenizer" --overwrite
stage "corpus: shards + manifest"
"${DC[@]}" data build --src "$STDLIB" --ext py --max-files "$MAX_FILES" --tokenizer "$OUT/tokenizer" \
  --out "$OUT/data" --val-fraction 0.05 --overwrite --quiet
stage "SFT set: signature + docstring -> function (train split only)"
"${DC[@]}" data sft-synth --data "$OUT/data" --out "$OUT/sft.jsonl" --max-samples "$SFT_N"
"${DC[@]}" data sft --src "$OUT/sft.jsonl" --tokenizer "$OUT/tokenizer" --out "$OUT/sft-data" --overwrite --quiet

stage "AR pretraining"
"${TRAIN[@]}" train --config "runs/configs/$SIZE-ar.toml" --data "$OUT/data" --model-config "$MODEL" \
  --tokenizer "$OUT/tokenizer" --out "$OUT/ar" --resume
stage "block-diffusion CPT (B=4, warmup, clipped noise)"
"${TRAIN[@]}" train --config "runs/configs/$SIZE-cpt.toml" --data "$OUT/data" --init "$OUT/ar/final" \
  --out "$OUT/cpt" --resume
stage "SFT (block diffusion on chats)"
"${TRAIN[@]}" train --config "runs/configs/$SIZE-sft.toml" --data "$OUT/sft-data" --init "$OUT/cpt/final" \
  --out "$OUT/sft" --resume
"${DC[@]}" plot "$OUT/ar" "$OUT/cpt" "$OUT/sft" --out "$OUT/curves.png"

stage "decode"
"${DC[@]}" generate --model "$OUT/cpt/final" --gen-length 32 "def read_file(path):"
"${DC[@]}" generate --model "$OUT/sft/final" --gen-length 64 --chat \
  "Implement this Python function.

\`\`\`python
def is_even(n):
    \"\"\"Return True when n is even.\"\"\"
\`\`\`"
stage "done: final model in $OUT/sft/final"

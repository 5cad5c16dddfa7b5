# Sourced by train_ar_sft.sh and train_ablations.sh.
#
# train_kept RUN RECORDS [diffcoder train flags]: train into RUN unless RUN/final holds a model
# already (an interrupted run continues with --resume), then copy its metrics.jsonl and run.json
# into RECORDS, where report.py reads them.
train_kept() {
  local run=$1 records=$2
  shift 2
  if [ ! -f "$run/final/model.safetensors" ]; then
    local resume=()
    [ -d "$run/checkpoints" ] && resume=(--resume)
    diffcoder train --out "$run" "${resume[@]}" "$@"
  fi
  mkdir -p "$records"
  cp "$run/metrics.jsonl" "$run/run.json" "$records/"
}

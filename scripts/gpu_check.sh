#!/usr/bin/env bash
# The whole GPU check, for a borrowed GPU machine with PyTorch + transformers installed
# (no network needed): the decode benchmarks on the Stable-DiffCoder-8B shape (random bf16
# weights) and the CUDA-only exactness tests. Each benchmark's last line is JSON; the lines are
# collected into $OUT/gpu_results.jsonl. Steps run in order of importance, each under a timeout,
# and a step is skipped once the whole script has used $BUDGET seconds, so that a short lease
# still returns the most important rows. Usage: OUT=/some/dir bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/diffcoder-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
SHAPE=${SHAPE:-sdc-8b} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} GEN=${GEN:-256}  # overridable for a CPU dry run
BUDGET=${BUDGET:-540}
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
bench() {  # name, max seconds, then benchmark flags
  local name=$1 max=$2; shift 2
  local t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 30 ]; then echo "== $name: skipped (budget spent)"; return; fi
  echo "== $name ($((SECONDS - START)) s in, timeout $t s): benchmarks/decode_speed.py $*"
  timeout "$t" $PY benchmarks/decode_speed.py "$@" > "$OUT/$name.txt" 2>&1
  grep -v -e '^{' -e '^USDT' "$OUT/$name.txt" | tail -n 45
  tail -n 1 "$OUT/$name.txt" | $PY -c "import json,sys; d=json.loads(sys.stdin.read()); d['name']='$name'; \
d['command']='python benchmarks/decode_speed.py $*'; print(json.dumps(d))" >> "$OUT/gpu_results.jsonl" 2>/dev/null \
    || echo "{\"name\": \"$name\", \"error\": \"no JSON line\"}" >> "$OUT/gpu_results.jsonl"
}
COMMON="--shape $SHAPE --device $DEVICE --dtype $DTYPE --prompt-len 64 --gen-length $GEN"
# 1. The compiled step inside a CUDA graph, the runner closest to the passes/s target, side by side
#    with the release-approach baseline, and a kernel-by-kernel profile of one decode (what the
#    pass spends besides its matmuls).
COMPILED=compiled_static; [ "$DEVICE" = cuda ] && COMPILED=compiled_cuda_graph
bench sdc8b_compiled_b1 240 $COMMON --runner $COMPILED --repeats 2 --profile 30
# 2. The default runner (CUDA graph, uncompiled) against the release-approach baseline, with and
#    without folding: the speed-up row, and the folding A/B at batch 1 and 16.
bench sdc8b_b1 120 $COMMON --batch-sizes 1,16 --repeats 2
bench sdc8b_fold_batch 90 $COMMON --batch-sizes 1,16 --fold-query-groups on --no-baseline --repeats 2
# 3. CUDA-only exactness: CUDA-graph decoding equals eager decoding and the release-rule oracle.
t=$(left); [ "$t" -gt 150 ] && t=150
if [ "$t" -ge 30 ]; then
  echo "== tests/test_gpu.py ($((SECONDS - START)) s in)"
  # The whole log (-rA: a line per test), so that every failure is named in the file that comes back.
  timeout "$t" $PY -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.txt" | tail -n 20
fi
# 4. Folding the query-head groups (SDPA then takes a fused kernel instead of the math path, which
#    repeats every layer's cached keys per query head): the compiled step at batch 16, where folding
#    pays (off by default on CUDA; docs/decoding.md, "Runners and numerics", says why).
bench sdc8b_compiled_fold_b16 200 $COMMON --runner $COMPILED --fold-query-groups on --batch-sizes 16 \
  --no-baseline --repeats 2
bench sdc8b_compiled_nofold_b16 200 $COMMON --runner $COMPILED --fold-query-groups off --batch-sizes 16 \
  --no-baseline --repeats 2
echo "done in $((SECONDS - START)) s: $(wc -l < "$OUT/gpu_results.jsonl") benchmark lines in $OUT/gpu_results.jsonl"

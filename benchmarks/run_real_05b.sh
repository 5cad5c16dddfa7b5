#!/usr/bin/env bash
# Decode speed of the real 0.5B models, side by side in one run: the AR base decoded AR
# (block length 1 + shift) and diffcoder-0.5b as block diffusion (B = 4, shift, one token per
# pass), batch 1, 8 and 16, bf16 on this machine's CPU; then diffcoder-0.5b with and without
# speculative decoding. Both models are pulled on first use.
# Outputs: benchmarks/results/cpu-real-0.5b/*.txt (the table; the last line is JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/cpu-real-0.5b
mkdir -p "$out"
py=.venv/bin/python
common=(--dtype bfloat16 --batch-sizes 1,8,16 --prompt-len 64 --gen-length 128 --repeats 2 --no-baseline --shift)
$py benchmarks/decode_speed.py --model qwen2.5-coder-0.5b-instruct --block-length 1 "${common[@]}" | tee "$out/ar_base.txt"
$py benchmarks/decode_speed.py --model diffcoder-0.5b --block-length 4 "${common[@]}" | tee "$out/diffcoder_05b.txt"
# Speculative decoding against one token per pass, on HumanEval prompts (what the model writes
# decides how many drafts hold).
$py benchmarks/speculative_speed.py --model diffcoder-0.5b --dtype bfloat16 --batch-sizes 1,16 | tee "$out/speculative.txt"

#!/usr/bin/env bash
# Decode speed of the real 0.5B models, side by side in one run: the AR base decoded AR
# (block length 1 + shift) and diffcoder-0.5b as block diffusion (B = 4, shift, one token per
# pass, leftmost masked position first as it ships), batch 1, 8 and 16, bf16 on this machine's CPU; diffcoder-0.5b at batch 1 with the
# compiled step; diffcoder-0.5b with its matmuls on oneDNN
# (the baseline of our kernels); the matmul kernels alone on this shape; then diffcoder-0.5b with
# and without speculative decoding. Both models are pulled on first use.
# Outputs: benchmarks/results/cpu-real-0.5b/*.txt (the table; the last line is JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/cpu-real-0.5b
mkdir -p "$out"
py=.venv/bin/python
common=(--dtype bfloat16 --batch-sizes 1,8,16 --prompt-len 64 --gen-length 128 --repeats 2 --no-baseline --shift)
$py benchmarks/decode_speed.py --model qwen2.5-coder-0.5b-instruct --block-length 1 "${common[@]}" | tee "$out/ar_base.txt"
# diffcoder-0.5b in its shipped order (leftmost masked position first).
$py benchmarks/decode_speed.py --model diffcoder-0.5b --block-length 4 --remasking left_to_right "${common[@]}" \
  | tee "$out/diffcoder_05b.txt"
# Batch 1 with the compiled step (torch.compile, inductor's C++ wrapper; the first run compiles for
# minutes, inductor keeps it on disk).
$py benchmarks/decode_speed.py --model diffcoder-0.5b --block-length 4 --dtype bfloat16 --batch-sizes 1 \
  --prompt-len 64 --gen-length 128 --repeats 2 --no-baseline --shift --remasking left_to_right --runner compiled_static \
  | tee "$out/diffcoder_05b_compiled.txt"
# The same decode with every bf16 matmul on oneDNN: the baseline of our CPU matmul kernel (AMX or
# AVX-512, whichever this CPU runs; the line above says which).
$py benchmarks/decode_speed.py --model diffcoder-0.5b --block-length 4 --dtype bfloat16 --batch-sizes 1,16 \
  --prompt-len 64 --gen-length 128 --repeats 1 --no-baseline --shift --remasking left_to_right --cpu-matmul onednn \
  | tee "$out/diffcoder_05b_onednn.txt"
# One decode pass's matmul weights of this shape streamed from memory, kernel by kernel, with the
# model in float32 beside them.
$py benchmarks/linear_kernels.py --streamed --model-shape qwen2.5-0.5b --fp32 --rows 4,8,64 --repeats 3 \
  | tee "$out/linear_kernels_streamed.txt"
# Speculative decoding against one token per pass, on HumanEval prompts (what the model writes
# decides how many drafts hold).
$py benchmarks/speculative_speed.py --model diffcoder-0.5b --dtype bfloat16 --batch-sizes 1,16 | tee "$out/speculative.txt"

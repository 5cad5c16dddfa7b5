"""Speculative decoding against one token per pass, side by side in one run, on real prompts.

The same model, prompts and settings decode twice per batch size: plainly (one token per pass)
and with `speculative=True` (drafts verified in copies of the block; docs/decoding.md). The
prompts are the first HumanEval problems in the evaluation's instruct format, since how many
drafts hold depends on what the model writes (random-token prompts would not say). Prints per
batch size and arm tokens/s, passes/s and tokens per pass (each row counted over the passes it
committed in, as `diffcoder eval` counts), whether the tokens are identical, then one JSON line.

    .venv/bin/python benchmarks/speculative_speed.py [--model diffcoder-0.5b] [--batch-sizes 1,16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from measure import hardware_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffcoder  # noqa: E402
from diffcoder.engine.decoding import Decoding, StepEvent  # noqa: E402
from diffcoder.eval.cli import weights_record  # noqa: E402
from diffcoder.eval.generation import prompt_ids  # noqa: E402
from diffcoder.eval.problems import load_benchmark  # noqa: E402
from diffcoder.hardware import pick_device, pick_dtype  # noqa: E402


def decode(model, prompts: list[list[int]], kw: dict) -> dict:  # noqa: ANN001
    passes: list[set[int]] = [set() for _ in prompts]
    committed = [0] * len(prompts)
    t0 = time.perf_counter()
    dec = Decoding(model, prompts, step_events=True, **kw)
    for ev in dec:
        if isinstance(ev, StepEvent):
            passes[ev.row].add(dec.nfe)
            committed[ev.row] += len(ev.positions)
    seconds = time.perf_counter() - t0
    tokens = sum(len(t) for t in dec.result.tokens)
    return {"seconds": seconds, "tokens": tokens, "passes": dec.nfe, "tokens_per_s": tokens / seconds,
            "passes_per_s": dec.nfe / seconds,
            "tokens_per_pass": sum(committed) / max(1, sum(len(p) for p in passes)), "out": dec.result.tokens}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="diffcoder-0.5b")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--remasking", default=None, help="default: the model's")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(pick_device("auto"))
    model = diffcoder.load(args.model, device=device, dtype=pick_dtype(args.dtype, device))
    tok = model.tokenizer
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    problems = load_benchmark("humaneval", limit=max(sizes))
    prompts = [prompt_ids(pr, "instruct", tok) for pr in problems]
    saved = model.generation_defaults or {}
    kw = dict(gen_length=args.gen_length, steps=args.gen_length, block_length=int(saved.get("block_length", 4)),
              shift=bool(saved.get("shift", False)), remasking=args.remasking or saved.get("remasking", "low_confidence"),
              eos_id=None)  # no early stop: every row decodes gen_length tokens, so the arms do the same work
    hw = hardware_name(device)
    print(f"{args.model} on {hw}, {model.dtype}, {kw['remasking']}, B = {kw['block_length']}, "
          f"{args.gen_length} new tokens per prompt, HumanEval prompts in the instruct format")
    decode(model, prompts[:1], {**kw, "gen_length": kw["block_length"] * 2, "steps": kw["block_length"] * 2})  # warm-up
    results = {}
    for b in sizes:
        plain = decode(model, prompts[:b], kw)
        spec = decode(model, prompts[:b], {**kw, "speculative": True})
        same = plain.pop("out") == spec.pop("out")
        results[f"batch{b}"] = {"plain": plain, "speculative": spec, "identical": same,
                                "speedup": spec["tokens_per_s"] / plain["tokens_per_s"]}
        for name, r in (("one token per pass", plain), ("speculative", spec)):
            print(f"batch {b:3d} {name:>18}: {r['tokens_per_s']:7.2f} tok/s  {r['passes_per_s']:7.2f} passes/s  "
                  f"{r['tokens_per_pass']:.2f} tokens per pass")
        print(f"batch {b:3d}: speculative / one token per pass = {results[f'batch{b}']['speedup']:.2f}x tok/s; "
              f"tokens identical: {same}")
    # Tokens per pass depend on the weights: report.py shows the run only for the weights it measured.
    summary = {"model": args.model, **weights_record(model), "hardware": hw, "dtype": str(model.dtype).removeprefix("torch."), **kw,
               "prompts": "humaneval instruct", "results": results}
    print()
    print("\n".join(markdown_table(summary)))
    print(json.dumps(summary))
    return summary


def markdown_table(summary: dict) -> list[str]:
    """The run as a table (report.py puts it in the model card)."""
    rows = ["| batch | one token per pass, tok/s | speculative, tok/s | speculative / one token per pass "
            "| speculative, tokens per pass | speculative, passes/s | one token per pass, passes/s | same tokens |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in summary["results"].items():
        plain, spec = r["plain"], r["speculative"]
        rows.append(f"| {key[5:]} | {plain['tokens_per_s']:.2f} | {spec['tokens_per_s']:.2f} | {r['speedup']:.2f}x "
                    f"| {spec['tokens_per_pass']:.2f} | {spec['passes_per_s']:.2f} | {plain['passes_per_s']:.2f} "
                    f"| {'yes' if r['identical'] else 'no'} |")
    return rows


if __name__ == "__main__":
    main()

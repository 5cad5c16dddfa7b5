"""Collect benchmark outputs (each file's last line is the JSON a benchmark printed) into the
markdown tables of benchmarks/RESULTS.md.

    python benchmarks/summarize.py benchmarks/results/*/*.txt
    python benchmarks/summarize.py --kernels benchmarks/results/cpu-real-0.5b/linear_kernels_streamed.txt
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# Commands of runs whose JSON predates the "command" field (the H100 runs of scripts/gpu_check.sh
# and the runner comparison right after it); gpu_results.jsonl records the rest.
KNOWN = {
    "sdc8b_compiled_cuda_graph": "python benchmarks/decode_speed.py --shape sdc-8b --device cuda --dtype bfloat16 "
                                 "--prompt-len 64 --gen-length 256 --runner compiled_cuda_graph --no-baseline "
                                 "--batch-sizes 1,16 --repeats 2",
    "sdc8b_cuda_graph": "python benchmarks/decode_speed.py --shape sdc-8b --device cuda --dtype bfloat16 --prompt-len 64 "
                        "--gen-length 256 --runner cuda_graph --no-baseline --batch-sizes 1,16 --repeats 2",
}

# Environment of kept runs whose JSON command lacks it (results/gpu-h100-s5/sdc8b_compiled_autotune_b1.txt:
# inductor's GEMM autotuning and coordinate-descent tuning, set through its env vars).
ENV = {"sdc8b_compiled_autotune_b1": "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 "}


def last_json(path: Path) -> dict | None:
    for line in reversed(path.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def commands(paths: list[Path]) -> dict[str, str]:
    found = dict(KNOWN)
    for p in paths:
        jl = p.with_name("gpu_results.jsonl")
        if jl.exists():
            for line in jl.read_text().splitlines():
                d = json.loads(line)
                if "command" in d:
                    found.setdefault(d["name"], d["command"])
    return found


def kernel_table(path: Path) -> None:
    """benchmarks/linear_kernels.py --streamed's lines: one row per (rows, method), each method's
    time for the whole pass's weights against the fastest bf16 method and oneDNN's, per row count."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    summary, rows = lines[-1], [r for r in lines[:-1] if "method" in r]
    print(f"{summary['hardware']}, {summary['threads']} threads, {summary['model_shape']}: "
          f"{summary['weight_bytes'] / 1e6:.0f} MB of bf16 matmul weights per pass (`{summary['command']}`)")
    print()
    print("| rows | method | ms per pass's weights | weight GB/s | oneDNN (packed for 4 rows) / this |")
    print("|---|---|---|---|---|")
    for m in sorted({r["rows"] for r in rows}):
        at_m = [r for r in rows if r["rows"] == m]
        onednn = next((r["pass_ms"] for r in at_m if r["method"] == "oneDNN packed for 4 rows"), None)
        for r in sorted(at_m, key=lambda r: r["pass_ms"]):
            ratio = f"{onednn / r['pass_ms']:.2f}x" if onednn and not r["method"].startswith("read") else ""
            print(f"| {m} | {r['method']} | {r['pass_ms']:.1f} | {r['weight_GBps']:.1f} | {ratio} |")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--kernels":
        for a in argv[1:]:
            kernel_table(Path(a))
        return
    paths = [Path(a) for a in argv]
    cmds = commands(paths)
    print("| run | hardware | model | dtype | runner | batch | tok/s | passes/s | passes/token | % of bandwidth "
          "limit | matmuls alone, % of limit | reading each weight once, % of limit | first block ms | baseline tok/s | speed-up | command |")
    print("|" + "---|" * 16)
    for p in paths:
        d = last_json(p)
        if d is None or "ours" not in d:
            continue
        cmd = d.get("command") or cmds.get(p.stem, "")
        if not cmd.startswith(ENV.get(p.stem, "")):
            cmd = ENV[p.stem] + cmd
        matmuls = d["runner"] + (f", {d['cpu_matmul']} matmuls" if d.get("cpu_matmul") else "")
        if d.get("remasking", "low_confidence") != "low_confidence":  # absent in older runs
            matmuls += f", {d['remasking']}"
        for key, r in d["ours"].items():
            batch, _, variant = key[5:].partition("_")  # "batch16" or "batch16_torch_ops" (--ab-torch-ops)
            runner = matmuls + ("".join(f", native {op}" for op in d.get("native_ops", []))  # absent in older runs
                                if not variant else ", SDPA, torch confidence ops")
            base = d.get("baseline") if key == "batch1" else None
            speed = f"{d['speedup']:.2f}x" if base else ""
            base_tps = f"{base['tokens_per_s']:.1f}" if base else ""
            alone = r.get("matmul_only_bandwidth_fraction")  # absent in runs that predate it
            alone = "" if alone is None else f"{100 * alone:.0f}%"
            read = d.get("weight_read_bandwidth_fraction")  # the same for every batch size of a run
            read = "" if read is None else f"{100 * read:.0f}%"
            print(f"| {p.stem} | {d['hardware']} | {d['model']} | {d['dtype']} | {runner} | {batch} | "
                  f"{r['tokens_per_s']:.1f} | {r['passes_per_s']:.1f} | {r['passes_per_token']:.3f} | "
                  f"{100 * r['bandwidth_fraction']:.1f}% | {alone} | {read} | {1e3 * r['time_to_first_block_s']:.0f} | "
                  f"{base_tps} | {speed} | `{cmd}` |")
        if "batch_scaling" in d:
            bound = d.get("batch_scaling_matmul_bound")  # absent in runs that predate it
            bound = "" if bound is None else f"; at most {bound:.2f}x with the largest batch's passes as their matmuls alone"
            print(f"| {p.stem} | | | | | scaling | {d['batch_scaling']:.2f}x (largest batch / batch 1 tokens/s{bound}) "
                  f"| | | | | | | | | |")
        for key, ratio in d.get("native_ops_speedup", {}).items():
            print(f"| {p.stem} | | | | | {key[5:]} | {ratio:.2f}x (native attention and confidence ops / SDPA and "
                  f"torch's ops, tokens/s) | | | | | | | | | |")


if __name__ == "__main__":
    main(sys.argv[1:])

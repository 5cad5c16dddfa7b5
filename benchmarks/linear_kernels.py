"""Which CPU linear kernel is fastest for decode-shaped matmuls (few rows, bf16 weights)?

For the projection shapes of one smol-135m layer, times y = x W^T for several row counts M
(4 = a block, 8 = the fused commit pass, 64 = batch 16 x B 4) with: F.linear in bf16, oneDNN
prepacked weights (what `PackedLinear` in diffcoder/model.py uses, packed for 4 rows or for M
rows), and F.linear in float32 for reference. Prints one JSON line per (M, method) with the weight
bandwidth it reaches (weight bytes / time) and the method's cost per call on a tiny 64 x 64 weight
(`call_us_64x64`: its fixed cost, paid once per matmul), and last a JSON summary with the
machine's measured copy bandwidth for scale. The layer's weights (7 MB) are reused call after
call, so they come from the caches here; in a decode pass each weight comes from memory (see
`decode.py`'s "matmuls alone").

    .venv/bin/python benchmarks/linear_kernels.py [--threads 2] [--rows 4,8,64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

# smol-135m: hidden 576, 9 heads x 64 (q 576), 3 KV heads (k, v 192 each), MLP 1536.
SHAPES = {"qkv": (576 + 2 * 192, 576), "o": (576, 576), "gate_up": (2 * 1536, 576), "down": (576, 1536)}


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        best = min(best, (time.perf_counter() - t0) / 20)
    return best


def copy_bandwidth() -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 3)
    return 2 * src.numel() / t / 1e9  # read + write


def call_cost(method: str, rows: int, repeats: int) -> float:
    """Seconds per call on a 64 x 64 weight (8 KB, in cache): what a method costs besides moving
    weights. A smol-135m pass makes 121 matmul calls, so this is paid 121 times per pass."""
    w = torch.randn(64, 64).to(torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    if method.startswith("oneDNN packed for "):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, int(method.split()[3]))
        return timed(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
    if "fp32" in method:
        w32, x32 = w.float(), x.float()
        return timed(lambda: F.linear(x32, w32), repeats)
    return timed(lambda: F.linear(x, w), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="4,8,64")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = {k: torch.randn(o, i).to(torch.bfloat16) for k, (o, i) in SHAPES.items()}
    wbytes = sum(w.numel() * 2 for w in weights.values())
    results = []
    with torch.inference_mode():
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, w.shape[1]).to(torch.bfloat16) for k, w in weights.items()}
            methods = {
                "F.linear bf16": {k: (lambda x, w=w: F.linear(x, w)) for k, w in weights.items()},
                **{f"oneDNN packed for {h} rows": {} for h in sorted({4, m})},
                "F.linear fp32": {},
            }
            for k, w in weights.items():
                for hint in sorted({4, m}):
                    name = f"oneDNN packed for {hint} rows"
                    packed = torch.ops.mkldnn._reorder_linear_weight(w, hint)
                    methods[name][k] = (lambda x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""))
                w32 = w.float()
                methods["F.linear fp32"][k] = (lambda x, w=w32: F.linear(x.float(), w))
            for name, fns in methods.items():
                t = timed(lambda: [fns[k](xs[k]) for k in weights], args.repeats)
                row = {"rows": m, "method": name, "layer_us": round(1e6 * t, 1),
                       "weight_GBps": round((wbytes * (2 if "fp32" in name else 1)) / t / 1e9, 2),
                       "call_us_64x64": round(1e6 * call_cost(name, m, args.repeats), 1)}
                results.append(row)
                print(json.dumps(row))
    best = {m: min((r for r in results if r["rows"] == m), key=lambda r: r["layer_us"])["method"]
            for m in sorted({r["rows"] for r in results})}
    print(json.dumps({"name": "linear_kernels", "command": "python " + " ".join(sys.argv), "threads": args.threads,
                      "copy_bandwidth_GBps": round(copy_bandwidth(), 1), "fastest": best}))


if __name__ == "__main__":
    main()

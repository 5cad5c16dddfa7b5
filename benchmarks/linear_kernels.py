"""Which CPU linear kernel is fastest for decode-shaped matmuls (few rows, bf16 weights)?

Times y = x W^T for several row counts M (4 = a block, 8 = the fused commit pass, 64 = batch 16
x B 4, 128 = batch 16's fused commit pass) with: F.linear in bf16, oneDNN prepacked weights (packed
for 4 rows or for M rows), our AMX kernel (diffcoder/kernels, where this CPU has AMX), and F.linear
in float32 for reference. `packed_linear` in diffcoder/kernels/linear.py uses the AMX kernel up to
`kernels.AMX_MAX_ROWS` rows and oneDNN (packed for 4 rows) above.

Default mode: the projection shapes of one smol-135m layer (7 MB), reused call after call, so the
weights come from the caches; each row also has the method's cost per call on a tiny 64 x 64
weight (`call_us_64x64`: its fixed cost, paid once per matmul).
`--streamed`: every matmul weight of one smol-135m decode pass (30 layers + the LM head, 269 MB),
each used once per sweep as in a decode, so they come from memory; methods alternate sweep by
sweep (this VM's speed drifts within seconds) and each keeps its best. A float32 sum over the same
bytes, one op per weight, is the read ceiling. Prints one JSON line per (M, method) with the weight
bandwidth reached (weight bytes / time), and last a JSON summary: the fastest method per M.

    .venv/bin/python benchmarks/linear_kernels.py [--threads 2] [--rows 4,8,64] [--streamed]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from diffcoder import kernels
from measure import alternating_best  # benchmarks/measure.py (on sys.path: this folder)

AMX = "AMX kernel (diffcoder)"
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
    if method == AMX:
        return timed(lambda: kernels.native_ops().packed_linear(x, w, None), repeats)
    if "fp32" in method:
        w32, x32 = w.float(), x.float()
        return timed(lambda: F.linear(x32, w32), repeats)
    return timed(lambda: F.linear(x, w), repeats)


def kernel_methods(weights: list[torch.Tensor], rows: int) -> dict[str, list]:
    """method name -> one function per weight, for the bf16 kernels a decode could use."""
    methods: dict[str, list] = {"F.linear bf16": [(lambda x, w=w: F.linear(x, w)) for w in weights]}
    for hint in sorted({4, rows}):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in weights]
        methods[f"oneDNN packed for {hint} rows"] = [
            (lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")) for p in packed]
    ops = kernels.native_ops()
    if ops is not None:
        packed = [ops.pack_amx(w) for w in weights]
        methods[AMX] = [(lambda x, p=p, n=w.shape[0]: ops.amx_linear(x, p, n, None)) for p, w in zip(packed, weights)]
    return methods


def streamed(args: argparse.Namespace) -> None:
    """Every weight of a smol-135m decode pass once per sweep, methods interleaved (see the doc)."""
    layer = [SHAPES[k] for k in ("qkv", "o", "gate_up", "down")]
    weights = [(torch.randn(o, i) * 0.02).to(torch.bfloat16) for _ in range(30) for o, i in layer]
    weights.append((torch.randn(49152, 576) * 0.02).to(torch.bfloat16))  # the tied LM head
    wbytes = sum(w.numel() * 2 for w in weights)
    views = [w.reshape(-1).view(torch.float32) for w in weights]
    results = []
    with torch.inference_mode():
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in {w.shape[1] for w in weights}}
            sweeps = {name: (lambda fns=fns: [f(xs[w.shape[1]]) for f, w in zip(fns, weights)])
                      for name, fns in kernel_methods(weights, m).items()}
            sweeps["read ceiling (float32 sum)"] = lambda: [v.sum() for v in views]
            for name, t in alternating_best(sweeps, args.repeats).items():
                row = {"rows": m, "method": name, "pass_ms": round(1e3 * t, 2), "weight_GBps": round(wbytes / t / 1e9, 2)}
                results.append(row)
                print(json.dumps(row))
    fastest = {m: min((r for r in results if r["rows"] == m and not r["method"].startswith("read")),
                      key=lambda r: r["pass_ms"])["method"] for m in sorted({r["rows"] for r in results})}
    print(json.dumps({"name": "linear_kernels_streamed", "command": "python " + " ".join(sys.argv),
                      "threads": args.threads, "weight_bytes": wbytes, "fastest": fastest}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="4,8,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--streamed", action="store_true", help="a whole decode pass's weights, from memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.streamed:
        return streamed(args)
    weights = {k: torch.randn(o, i).to(torch.bfloat16) for k, (o, i) in SHAPES.items()}
    wbytes = sum(w.numel() * 2 for w in weights.values())
    results = []
    with torch.inference_mode():
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, w.shape[1]).to(torch.bfloat16) for k, w in weights.items()}
            names = list(weights)
            methods = {name: dict(zip(names, fns)) for name, fns in kernel_methods(list(weights.values()), m).items()}
            methods["F.linear fp32"] = {k: (lambda x, w32=w.float(): F.linear(x.float(), w32)) for k, w in weights.items()}
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

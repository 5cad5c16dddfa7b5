"""Which CPU linear kernel is fastest for decode-shaped matmuls (few rows, bf16 weights)?

Times y = x W^T for several row counts M (4 = a block, 8 = the fused commit pass, 64 = batch 16
x B 4, 128 = batch 16's fused commit pass) with: F.linear in bf16, oneDNN prepacked weights (packed
for 4 rows or for M rows), our AMX kernel (diffcoder/kernels, where this CPU has AMX), our AVX-512
kernel (where it has AVX-512), and F.linear in float32 for reference. `packed_linear` in
diffcoder/kernels/linear.py uses the AMX kernel up to `kernels.AMX_MAX_ROWS` rows and oneDNN
(packed for 4 rows) above; on a CPU without native bf16 products, the AVX-512 kernel for all.

Default mode: the projection shapes of one smol-135m layer (7 MB), reused call after call, so the
weights come from the caches; each row also has the method's cost per call on a tiny 64 x 64
weight (`call_us_64x64`: its fixed cost, paid once per matmul).
`--streamed`: every matmul weight of one decode pass (`--model-shape`: smol-135m, 30 layers + the
LM head, 269 MB; or qwen2.5-0.5b, 24 layers + the LM head, 988 MB), each used once per sweep as in
a decode, so they come from memory (`--fp32` adds the pass with float32 weights); methods
alternate sweep by sweep (this VM's speed drifts within seconds) and each keeps its best. A float32 sum over the same
bytes, one op per weight, is the read ceiling. Prints one JSON line per (M, method) with the weight
bandwidth reached (weight bytes / time), and last a JSON summary: the fastest method per M.

    .venv/bin/python benchmarks/linear_kernels.py [--threads 2] [--rows 4,8,64] [--streamed]
    .venv/bin/python benchmarks/linear_kernels.py --streamed --model-shape qwen2.5-0.5b --fp32
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from diffcoder import kernels
from measure import alternating_best, hardware_name  # benchmarks/measure.py (on sys.path: this folder)

AMX = "AMX kernel (diffcoder)"
AVX512 = "AVX-512 kernel (diffcoder)"
FP32 = "F.linear fp32 (float32 weights)"
# One layer's projections (out, in) and the LM head, per model shape; --model-shape picks one.
MODEL_SHAPES = {
    # smol-135m: hidden 576, 9 heads x 64 (q 576), 3 KV heads (k, v 192 each), MLP 1536, 30 layers, tied head.
    "smol-135m": ({"qkv": (576 + 2 * 192, 576), "o": (576, 576), "gate_up": (2 * 1536, 576), "down": (576, 1536)},
                  30, (49152, 576)),
    # Qwen2.5-0.5B (diffcoder-0.5b): hidden 896, 14 heads x 64, 2 KV heads (k, v 128 each), MLP 4864,
    # 24 layers, the LM head untied.
    "qwen2.5-0.5b": ({"qkv": (896 + 2 * 128, 896), "o": (896, 896), "gate_up": (2 * 4864, 896), "down": (896, 4864)},
                     24, (151936, 896)),
}
SHAPES = MODEL_SHAPES["smol-135m"][0]


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
    if method == AVX512:
        return timed(lambda: kernels.avx512_ops().bf16_linear(x, w, None), repeats)
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
    avx512 = kernels.avx512_ops()
    if avx512 is not None:
        methods[AVX512] = [(lambda x, w=w: avx512.bf16_linear(x, w, None)) for w in weights]
    return methods


def streamed(args: argparse.Namespace) -> None:
    """Every weight of a decode pass once per sweep, methods interleaved (see the doc)."""
    shapes, n_layers, head = MODEL_SHAPES[args.model_shape]
    layer = [shapes[k] for k in ("qkv", "o", "gate_up", "down")]
    weights = [(torch.randn(o, i) * 0.02).to(torch.bfloat16) for _ in range(n_layers) for o, i in layer]
    weights.append((torch.randn(*head) * 0.02).to(torch.bfloat16))  # the LM head
    wbytes = sum(w.numel() * 2 for w in weights)
    fp32 = [w.float() for w in weights] if args.fp32 else []
    views = [w.reshape(-1).view(torch.float32) for w in weights]
    results = []
    with torch.inference_mode():
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k).to(torch.bfloat16) for k in {w.shape[1] for w in weights}}
            sweeps = {name: (lambda fns=fns: [f(xs[w.shape[1]]) for f, w in zip(fns, weights)])
                      for name, fns in kernel_methods(weights, m).items()}
            if fp32:  # the same pass with the model converted to float32 (twice the bytes)
                xs32 = {k: x.float() for k, x in xs.items()}
                sweeps[FP32] = lambda: [F.linear(xs32[w.shape[1]], w) for w in fp32]
            sweeps["read ceiling (float32 sum)"] = lambda: [v.sum() for v in views]
            for name, t in alternating_best(sweeps, args.repeats).items():
                nbytes = 2 * wbytes if name == FP32 else wbytes  # float32 weights: twice the bytes
                row = {"rows": m, "method": name, "pass_ms": round(1e3 * t, 2), "weight_GBps": round(nbytes / t / 1e9, 2)}
                results.append(row)
                print(json.dumps(row))
    fastest = {m: min((r for r in results if r["rows"] == m and not r["method"].startswith("read")),
                      key=lambda r: r["pass_ms"])["method"] for m in sorted({r["rows"] for r in results})}
    print(json.dumps({"name": "linear_kernels_streamed", "command": "python " + " ".join(sys.argv),
                      "hardware": hardware_name(torch.device("cpu")), "model_shape": args.model_shape,
                      "threads": args.threads, "weight_bytes": wbytes, "fastest": fastest}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="4,8,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--streamed", action="store_true", help="a whole decode pass's weights, from memory")
    ap.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="smol-135m",
                    help="--streamed: whose decode pass (default smol-135m)")
    ap.add_argument("--fp32", action="store_true",
                    help="--streamed: also the pass with float32 weights and F.linear (the model converted)")
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

"""Decode-step attention on a CPU: our native op against SDPA, at the shapes a decode makes.

A smol-135m decode step folds its 3 query heads per KV head onto one query: 12 rows per (sequence,
KV head) in a block step (3 heads x 4 tokens), 24 in the fused commit pass, over a static cache
of `--keys` columns (default 128: a 64-token prompt and 64 new tokens) of which the mask lets
`--seen` be seen. Each setting runs 30 layers' worth of distinct caches per sweep (one decode
pass's attention, the caches mostly out of L2 as in a decode), the two methods alternating sweep
by sweep (this VM's speed drifts within seconds), each keeping its best. Both methods get the
same bf16 tensors; the op's result is checked against SDPA's to bf16 rounding before timing.
Prints one JSON line per (batch, rows, method) with the microseconds per call, and last a JSON
summary with SDPA's time over the op's per setting.

    .venv/bin/python benchmarks/attention_kernels.py [--batch-sizes 1,16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from diffcoder import kernels
from measure import alternating_best  # benchmarks/measure.py (on sys.path: this folder)

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # smol-135m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--rows", default="12,24", help="folded query rows per (sequence, KV head)")
    ap.add_argument("--keys", type=int, default=128)
    ap.add_argument("--seen", type=int, default=100, help="cache columns the mask lets every row see")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ops = kernels.native_ops()
    if ops is None:
        sys.exit("attention_kernels: the native kernels are unavailable on this machine (see the warning above)")
    gen = torch.Generator().manual_seed(0)
    results, ratios = [], {}
    with torch.inference_mode():
        for b in (int(x) for x in args.batch_sizes.split(",")):
            caches = [tuple(torch.randn(b, KV_HEADS, args.keys, HEAD_DIM, generator=gen).to(torch.bfloat16)
                            for _ in range(2)) for _ in range(LAYERS)]
            for rows in (int(x) for x in args.rows.split(",")):
                q = torch.randn(b, KV_HEADS, rows, HEAD_DIM, generator=gen).to(torch.bfloat16)
                mask = torch.zeros(b, 1, rows, args.keys, dtype=torch.bool)
                mask[..., :args.seen] = True
                scale = HEAD_DIM ** -0.5
                k, v = caches[0]
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
                err = (ops.decode_attention(q, k, v, mask, scale).float() - ref).abs().max().item()
                if err > 2 ** -7 * ref.abs().max().item() + 1e-3:
                    sys.exit(f"attention_kernels: the native op differs from SDPA by {err} at batch {b}, {rows} rows")
                methods = {
                    "native op (diffcoder)": lambda: [ops.decode_attention(q, k, v, mask, scale) for k, v in caches],
                    "SDPA": lambda: [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for k, v in caches],
                }
                best = {name: t / LAYERS for name, t in alternating_best(methods, args.repeats).items()}
                for name, t in best.items():
                    row = {"batch": b, "rows": rows, "keys": args.keys, "seen": args.seen, "method": name,
                           "us_per_call": round(1e6 * t, 1)}
                    results.append(row)
                    print(json.dumps(row))
                ratios[f"batch{b}_rows{rows}"] = round(best["SDPA"] / best["native op (diffcoder)"], 2)
    print(json.dumps({"name": "attention_kernels", "command": "python " + " ".join(sys.argv), "threads": args.threads,
                      "sdpa_over_native": ratios}))


if __name__ == "__main__":
    main()

"""Serve load: concurrent streaming clients against a real server, measured.

    python benchmarks/serve_load.py --model DIR --clients 32 --max-tokens 64 --max-batch 1 8 32 --verify

Starts the server in-process on a loopback port (or targets `--url`), fires `--clients`
streaming completions at once, and prints throughput, latency percentiles, time to first
chunk and batch sizes (from /metrics). With several `--max-batch` values it runs each, so the
effect of batching is visible on the same machine. Every figure docs/serving.md quotes comes
from this script.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

import diffcoder
from diffcoder.hardware import pick_device
from diffcoder.serve.app import ServeConfig, create_app
from diffcoder.serve.background import BackgroundServer
from diffcoder.engine.settings import resolve


@dataclass
class Sample:
    latency: float
    first_chunk: float
    tokens: int
    text: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: diffcoder.default_model_dir())")
    p.add_argument("--url", default=None, help="measure an already running server at this base URL instead")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default 32)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per request (default: max_tokens)")
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 8],
                   help="server --max-batch values to compare (in-process server only; default: 1 8)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="server batch window in ms (in-process server only; default 10)")
    p.add_argument("--device", default="auto", help="torch device for the in-process model: cpu, cuda, cuda:N "
                   "or auto (cuda when available; the default)")
    p.add_argument("--verify", action="store_true",
                   help="also decode every prompt alone with the engine and count outputs that differ "
                        "from the served (batched) ones (in-process server only)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    if args.clients < 1 or args.max_tokens < 1:
        p.error("--clients and --max-tokens must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.url:
        results = [asyncio.run(_measure(args.url.rstrip("/"), args)) | {"max_batch": None}]
    else:
        results = _measure_in_process(args)
    _report(results, args)


def _measure_in_process(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One in-process server per --max-batch value, on the same loaded model, each measured."""
    model = diffcoder.load(args.model or diffcoder.default_model_dir(), device=pick_device(args.device))
    results = []
    for max_batch in args.max_batch:
        config = ServeConfig(max_batch=max_batch, max_queue=max(64, args.clients),
                             batch_window_s=args.batch_window_ms / 1000)
        with BackgroundServer(create_app(model, model_name="bench", config=config)) as srv:
            result = asyncio.run(_measure(srv.url, args)) | {"max_batch": max_batch}
        if args.verify:
            result["differ_from_alone"] = _count_differences(model, result.pop("texts"), args)
        results.append(result)
    return results


async def _measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    body = {"prompt": "", "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if args.steps:
        body["steps"] = args.steps
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        before = await _batches(client)
        t0 = time.perf_counter()
        samples = await asyncio.gather(*[_one(client, {**body, "prompt": p}) for p in _prompts(args.clients)])
        wall = time.perf_counter() - t0
        after = await _batches(client)
        # A client can finish a moment before its batch is recorded: wait (bounded) for it.
        for _ in range(100):
            if after[1] - before[1] >= args.clients:
                break
            await asyncio.sleep(0.05)
            after = await _batches(client)
    tokens = sum(s.tokens for s in samples)
    lat = sorted(s.latency for s in samples)
    count, rows = after[0] - before[0], after[1] - before[1]
    return {
        "clients": args.clients, "max_tokens": args.max_tokens, "wall_s": wall, "tokens": tokens,
        "tokens_per_s": tokens / wall, "latency_p50_s": statistics.median(lat),
        "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        "first_chunk_p50_s": statistics.median(s.first_chunk for s in samples),
        "batches": int(count), "mean_batch_rows": rows / count if count else 0.0,
        "texts": [s.text for s in samples],
    }


def _prompts(n: int) -> list[str]:
    # Varied lengths, so batches mix block alignments as real traffic does.
    return [f"def task_{i}(items):\n    " + "# " * (i % 5) for i in range(n)]


def _count_differences(model: Any, texts: list[str], args: argparse.Namespace) -> int:
    """How many served outputs differ from the same prompt decoded alone (greedy)."""
    tok = model.tokenizer
    block = resolve({}, model)["block_length"]
    gen = -(-args.max_tokens // block) * block
    differ = 0
    for prompt, served in zip(_prompts(args.clients), texts):
        ids = diffcoder.generate(model, [tok.encode(prompt)], steps=args.steps or gen, gen_length=gen,
                                 eos_id=tok.eos_id).tokens[0][: args.max_tokens]
        alone = tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
        differ += alone != served
    return differ


async def _one(client: Any, body: dict[str, Any]) -> Sample:
    t0 = time.perf_counter()
    first, tokens, parts = None, 0, []
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            first = first if first is not None else time.perf_counter() - t0
            chunk = json.loads(line[6:])
            parts.extend(c.get("text", "") for c in chunk.get("choices", []))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Sample(time.perf_counter() - t0, first or 0.0, tokens, "".join(parts))


async def _batches(client: Any) -> tuple[float, float]:
    text = (await client.get("/metrics")).text
    count = re.search(r"^diffcoder_batch_size_count (\S+)$", text, re.M)
    total = re.search(r"^diffcoder_batch_size_sum (\S+)$", text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


def _report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for r in results:
        r.pop("texts", None)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    where = args.url or f"in-process server, device {args.device}"
    table = Table(title=f"{args.clients} concurrent streaming clients, max_tokens {args.max_tokens} ({where})")
    for col in ("max_batch", "wall s", "tokens/s", "p50 latency s", "p95 latency s", "p50 first chunk s",
                "batches", "mean rows/batch", "differ from alone"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["max_batch"] or "-"), f"{r['wall_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['latency_p50_s']:.2f}", f"{r['latency_p95_s']:.2f}", f"{r['first_chunk_p50_s']:.2f}",
                      str(r["batches"]), f"{r['mean_batch_rows']:.1f}", str(r.get("differ_from_alone", "-")))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()

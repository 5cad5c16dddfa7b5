"""Bounded load test: 32 concurrent streaming clients on a tiny model.

All finish, none is lost, each streamed output equals the output of the same prompt decoded
alone, requests really were batched together, and /health answers throughout. And the load
benchmark (benchmarks/serve_load.py) reports every request.
"""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

import diffcoder
from diffcoder.serve.app import ServeConfig, create_app
from diffcoder.serve.background import BackgroundServer
from serve_load import main as serve_load  # benchmarks/serve_load.py

pytestmark = pytest.mark.slow  # the slow tier: `make test-fast` skips it

CLIENTS = 32
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return diffcoder.load(tiny_model_dir)


def prompts() -> list[str]:
    # Different lengths (every remainder mod the block length) so batches mix alignments.
    return [f"def f{i}(x):\n    return x" + " + 1" * (i % 7) for i in range(CLIENTS)]


def alone(model, text: str) -> str:
    tok = model.tokenizer
    res = diffcoder.generate(model, [tok.encode(text)], steps=MAX_TOKENS, gen_length=MAX_TOKENS, eos_id=tok.eos_id)
    ids = res.tokens[0]
    return tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)


async def stream_one(client: openai.AsyncOpenAI, text: str) -> tuple[str, int]:
    stream = await client.completions.create(model="tiny", prompt=text, max_tokens=MAX_TOKENS, stream=True)
    parts, chunks = [], 0
    async for chunk in stream:
        parts.append(chunk.choices[0].text)
        chunks += 1
    return "".join(parts), chunks


async def watch_health(url: str, stop: asyncio.Event) -> list[float]:
    """Latency of each /health call while the load runs (each must answer 200)."""
    latencies = []
    async with httpx.AsyncClient(timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await c.get(url + "/health")
            assert r.status_code == 200
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    return latencies


async def run_load(url: str, texts: list[str]) -> tuple[list[tuple[str, int]], list[float]]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    stop = asyncio.Event()
    health = asyncio.create_task(watch_health(url, stop))
    try:
        results = await asyncio.wait_for(asyncio.gather(*[stream_one(client, t) for t in texts]), timeout=240)
    finally:
        stop.set()
    return results, await health


def test_32_concurrent_streams_all_finish_and_match_single_runs(model):
    texts = prompts()
    expected = [alone(model, t) for t in texts]
    app = create_app(model, model_name="tiny", config=ServeConfig(max_batch=8, max_queue=64))
    with BackgroundServer(app) as srv:
        results, latencies = asyncio.run(run_load(srv.url, texts))
        for _ in range(100):  # the last batch is recorded just after its last client finishes
            metrics = httpx.get(srv.url + "/metrics").text
            if re.search(rf"^diffcoder_batch_size_sum {CLIENTS}\.0$", metrics, re.M):
                break
            time.sleep(0.05)
    assert len(results) == CLIENTS
    for i, ((text, chunks), want) in enumerate(zip(results, expected)):
        assert chunks >= 1, f"client {i} got no chunk"
        assert text == want, f"client {i}: batched output differs from the single-request output"
    assert latencies and max(latencies) < 5.0, f"/health stalled: {max(latencies):.2f}s"
    count = float(re.search(r"^diffcoder_batch_size_count (\S+)$", metrics, re.M).group(1))
    rows = float(re.search(r"^diffcoder_batch_size_sum (\S+)$", metrics, re.M).group(1))
    assert rows == CLIENTS and count < CLIENTS, "requests were not batched together"


def test_serve_load_benchmark_reports_every_request(tiny_model_dir, capsys):
    """benchmarks/serve_load.py: every client counted, batch sizes from /metrics, outputs as decoded alone."""
    serve_load(["--model", str(tiny_model_dir), "--clients", "4", "--max-tokens", "8",
                "--max-batch", "1", "4", "--verify", "--json"])
    runs = json.loads(capsys.readouterr().out)
    assert [r["max_batch"] for r in runs] == [1, 4]
    for r in runs:
        assert r["clients"] == 4 and 0 < r["tokens"] <= 4 * 8 and r["tokens_per_s"] > 0
    assert runs[0]["batches"] == 4 and runs[0]["mean_batch_rows"] == 1.0
    assert [r["differ_from_alone"] for r in runs] == [0, 0]

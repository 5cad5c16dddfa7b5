"""The OpenAI-compatible server, driven over a real loopback socket with the official client.

Outputs of the random tiny model are gibberish, so every check compares the served text with
what the engine itself produces for the same prompt and settings (exact equality).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import diffcoder
from diffcoder.serve.app import ServeConfig, create_app
from diffcoder.serve.background import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return diffcoder.load(tiny_model_dir)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, model_name=MODEL, config=ServeConfig(max_batch=8, max_queue=64))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine_text(model, ids: list[int], max_tokens: int, steps: int | None = None, **kw) -> tuple[str, str]:
    """(text, finish_reason) the engine gives for one prompt alone, as the server should report it."""
    tok = model.tokenizer
    gen_length = -(-max_tokens // 4) * 4
    res = diffcoder.generate(model, [ids], steps=steps or gen_length, gen_length=gen_length, eos_id=tok.eos_id, **kw)
    toks = res.tokens[0][:max_tokens]
    if tok.eos_id in toks:
        return tok.decode(toks[: toks.index(tok.eos_id)]), "stop"
    return tok.decode(toks), "length"


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_engine_output(client, model):
    prompt = "def add(a, b):\n    return"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, extra_body={"steps": 12})
    text, reason = engine_text(model, model.tokenizer.encode(prompt), 12)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_speculative_request_decodes_the_same_text(client, model):
    prompt = "def add(a, b):\n    return"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, extra_body={"speculative": True})
    assert r.choices[0].text == engine_text(model, model.tokenizer.encode(prompt), 16)[0]


def test_max_tokens_rounds_up_to_blocks_and_cuts(client, model):
    # max_tokens=6 decodes 8 tokens (two blocks of 4) and returns the first 6.
    prompt = "x = [1, 2, 3]\n"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, extra_body={"steps": 8})
    text, _ = engine_text(model, model.tokenizer.encode(prompt), 6, steps=8)
    assert r.choices[0].text == text
    assert r.usage.completion_tokens <= 6


def test_token_id_prompt_and_echo(client, model):
    ids = model.tokenizer.encode("import os\n")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, echo=True)
    text, _ = engine_text(model, ids, 8)
    assert r.choices[0].text == "import os\n" + text


def test_chat_equals_engine_output(client, model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Reverse a list."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text, reason = engine_text(model, ids, 16)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason


def test_streaming_one_chunk_per_block(client, model):
    prompt = "class Stack:\n"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16)
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    # One chunk per committed block: count the engine's BlockEvents for the same decode.
    dec = diffcoder.Decoding(model, [model.tokenizer.encode(prompt)], steps=16, gen_length=16,
                             eos_id=model.tokenizer.eos_id)
    assert len(text_chunks) == sum(1 for ev in dec if ev.tokens or ev.finished)
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": "hello"}]
    parts = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True))
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content


def test_infilling_with_suffix_matches_diffcoder_infill(client, model):
    prefix, suffix = "def square(x):\n    return ", "\n\nprint(square(3))\n"
    r = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix, max_tokens=8)
    assert r.choices[0].text == diffcoder.infill(model, prefix, suffix, gen_length=8, steps=8)


def test_stop_string_cuts_and_reports_stop(client):
    base = client.completions.create(model=MODEL, prompt="for i in range(10):", max_tokens=24).choices[0].text
    stop = base[5:7]
    assert len(stop) == 2
    expected = base[: base.find(stop)]
    r = client.completions.create(model=MODEL, prompt="for i in range(10):", max_tokens=24, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(model=MODEL, prompt="for i in range(10):", max_tokens=24,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n_and_seed(client):
    greedy = client.completions.create(model=MODEL, prompt="s = ", max_tokens=8, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.text for c in greedy.choices}) == 1
    a = client.completions.create(model=MODEL, prompt="s = ", max_tokens=8, n=2, temperature=1.0, seed=11)
    b = client.completions.create(model=MODEL, prompt="s = ", max_tokens=8, n=2, temperature=1.0, seed=11)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def _post(server, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + kw.pop("path", "/v1/completions"), content=content,
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, timeout=30)


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"prompt": "x", "max_token": 8}, 400, "unknown field 'max_token'"),
    ({"prompt": 5}, 400, "'prompt' must be a string, a list of strings"),
    ({"prompt": "x", "stop": 5}, 400, "'stop' must be a string or a list of strings"),
    ({"prompt": [[1, 2]], "suffix": "y"}, 400, "needs the prompt as text"),
    ({"max_tokens": 8}, 400, "'prompt' is required"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "not served here"),
    ({"prompt": "x", "max_tokens": 8, "steps": 3}, 400, "multiple of the number of blocks"),
    ({"prompt": "x", "max_tokens": 8, "block_length": 0}, 400, "block_length"),
    ({"prompt": "x", "max_tokens": 4000}, 400, "context"),
    ({"prompt": "x", "top_p": 0.9, "temperature": 0.7}, 400, "top_p"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, 400,
     "cannot constrain its output to JSON"),
    ({"prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format 'json_object'"),
    ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
      "tool_choice": "required"}, 400, "never makes tool calls"),
    ({"prompt": "x", "n": 10 ** 12}, 400, "'n'"),
    ({"prompt": "x", "seed": 2 ** 64, "temperature": 1.0}, 400, "'seed'"),
    ({"prompt": "x", "seed": 2 ** 63, "temperature": 1.0}, 400, "'seed'"),
    ({"prompt": "x", "stop": "y" * 257}, 400, "at most 256 characters"),
    ({"prompt": "def f():\ud800"}, 400, "'prompt' contains a lone UTF-16 surrogate (\\ud800) at character 8"),
    ({"prompt": ["ok", "\udc00"]}, 400, "'prompt.1' contains a lone UTF-16 surrogate"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "remasking": "sometimes"}, 400, "remasking"),
    ({"prompt": "x", "speculative": True, "temperature": 0.5}, 400, "temperature 0"),
    ({"prompt": "x", "n": 99}, 400, "lower n"),
    ({"prompt": [1, 2, 99999]}, 400, "vocabulary"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": ""} , 200, None),  # an empty prompt means start-of-document, not an error
]


@pytest.mark.parametrize("body,status,words", BAD_REQUESTS)
def test_bad_completion_requests_get_clear_4xx(server, body, status, words):
    r = _post(server, body)
    assert r.status_code == status, r.text
    if words:
        err = r.json()["error"]
        assert words in err["message"]
        assert set(err) == {"message", "type", "param", "code"}


def test_bad_chat_requests_and_routes(server):
    r = _post(server, {"model": MODEL, "messages": []}, path="/v1/chat/completions")
    assert r.status_code == 400 and "messages is empty" in r.json()["error"]["message"]
    r = _post(server, {"messages": [{"role": "wizard", "content": "hi"}]}, path="/v1/chat/completions")
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]["message"]


def test_body_over_limit_is_413(server):
    r = _post(server, {"prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit must hold on the bytes actually sent
        yield b'{"prompt": "'
        for _ in range(32):
            yield b"x" * (64 << 10)
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=0.5,
                                       temperature=0.8)


def test_bad_requests_do_not_disturb_concurrent_good_ones(server, model):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            good = [c.post("/v1/completions", json={"prompt": f"v{i} = ", "max_tokens": 8}) for i in range(4)]
            bad = [c.post("/v1/completions", json={"prompt": "x", "max_tokens": 8, "steps": 5}) for _ in range(4)]
            return await asyncio.gather(*good, *bad)

    results = asyncio.run(go())
    assert [r.status_code for r in results] == [200] * 4 + [400] * 4
    for i, r in enumerate(results[:4]):
        assert r.json()["choices"][0]["text"] == engine_text(model, model.tokenizer.encode(f"v{i} = "), 8)[0]


def test_metrics_in_prometheus_format(server, client):
    client.completions.create(model=MODEL, prompt="y = ", max_tokens=8)
    text = httpx.get(server.url + "/metrics").text
    assert re.search(r'diffcoder_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text)
    assert re.search(r'diffcoder_requests_total\{endpoint="/v1/completions",status="400"\} [1-9]', text)
    for name in ("diffcoder_queue_depth", "diffcoder_batch_size_bucket", "diffcoder_tokens_per_second",
                 "diffcoder_forward_passes_per_token", "diffcoder_generated_tokens_total"):
        assert name in text
    tps = float(re.search(r"^diffcoder_tokens_per_second (\S+)$", text, re.M).group(1))
    assert tps > 0


def test_api_key_required_when_set(model):
    app = create_app(model, model_name=MODEL, config=ServeConfig(api_key="s3cret"))
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model=MODEL, prompt="x", max_tokens=4).choices[0].finish_reason
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open for probes


def test_full_queue_gets_429_with_retry_after(model):
    app = create_app(model, model_name=MODEL, config=ServeConfig(max_batch=1, max_queue=1))
    body = {"prompt": "q", "max_tokens": 64, "steps": 64}

    async def go():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(6)])

    with BackgroundServer(app) as srv:
        results = asyncio.run(go())
    codes = [r.status_code for r in results]
    limited = [r for r in results if r.status_code == 429]
    assert 200 in codes and 429 in codes, codes
    assert set(codes) <= {200, 429}
    assert all(int(r.headers["Retry-After"]) >= 1 for r in limited)


def test_request_timeout_is_408(model):
    app = create_app(model, model_name=MODEL, config=ServeConfig(request_timeout=0.3))
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "t", "max_tokens": 1024, "steps": 1024}, timeout=60)
        assert r.status_code == 408 and "timeout" in r.json()["error"]["message"]
        # Streaming: a timeout before or after the first chunk reaches the openai client as an error.
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="timeout"):
            list(client.completions.create(model=MODEL, prompt="t", max_tokens=1024, stream=True,
                                           extra_body={"steps": 1024}))
        # The engine is free again afterwards: a small request still succeeds.
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "t", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200


def test_disconnect_mid_stream_frees_the_batch_slot(model):
    app = create_app(model, model_name=MODEL, config=ServeConfig())
    gen = 1024
    with BackgroundServer(app) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "d", "max_tokens": gen, "steps": gen, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # first block arrived: hang up
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = httpx.get(srv.url + "/metrics").text
            if re.search(r"^diffcoder_batch_size_count 1\.0$", metrics, re.M):
                break
            time.sleep(0.05)
        tokens = float(re.search(r"^diffcoder_generated_tokens_total (\S+)$", metrics, re.M).group(1))
    assert re.search(r"^diffcoder_batch_size_count 1\.0$", metrics, re.M), "the batch never ended"
    assert 0 < tokens < gen  # the row was dropped long before its 1024 tokens


@pytest.mark.slow
def test_cli_serve_starts_and_rejects_bad_flags(tiny_model_dir, capsys):
    from diffcoder.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--max-batch", "0"]) == 2
    assert main(["serve", "--model", "/nonexistent/model"]) == 2
    assert main(["serve", "--model", str(tiny_model_dir), "--port", "70000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--max-batch" in err[0] and "/nonexistent/model" in err[1] and "--port" in err[2]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "diffcoder.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", "0", "--log-level", "info"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        deadline = time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port, "the server did not report its port"
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health == {"status": "ok", "model": Path(tiny_model_dir).name, "queue_depth": 0}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_shutdown_answers_waiting_requests_with_503(model):
    from diffcoder.serve.scheduler import BatchKey, Job, Scheduler, ServerStopping

    async def go():
        sched = Scheduler(model, eos_id=model.tokenizer.eos_id)  # engine thread not started: the job waits
        job = Job(prompts=[[1, 2, 3]], key=BatchKey(8, 8, 4, None, "low_confidence", 0.0, False),
                  want_steps=False, loop=asyncio.get_running_loop())
        sched.submit(job)
        assert sched.queue_depth == 1
        sched.stop()
        return await asyncio.wait_for(job.queue.get(), 5), sched.queue_depth

    (kind, exc), depth = asyncio.run(go())
    assert kind == "error" and isinstance(exc, ServerStopping) and depth == 0


def test_requests_with_different_settings_each_get_their_own_settings(server, model):
    # Different `steps` cannot share a batch: they wait their turn, and each gets its own decode.
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            bodies = [{"prompt": f"k{i} = ", "max_tokens": 8, "steps": 8 if i % 2 else 2} for i in range(4)]
            return bodies, await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])

    bodies, results = asyncio.run(go())
    for body, r in zip(bodies, results):
        assert r.status_code == 200
        want = engine_text(model, model.tokenizer.encode(body["prompt"]), 8, steps=body["steps"])[0]
        assert r.json()["choices"][0]["text"] == want


def test_runner_flag_decodes_the_same_text_and_bad_runners_fail_at_startup(model, runners_used):
    """--runner static (the CUDA-graph runner's static-shape pass, run eagerly on a CPU) serves
    exactly what the engine decodes; a runner the device cannot run, or an unknown one, fails
    before the server starts."""
    prompt = "def add(a, b):\n    return"
    app = create_app(model, model_name=MODEL, config=ServeConfig(runner="static"))
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model=MODEL, prompt=[prompt, "x = "], max_tokens=12, extra_body={"steps": 12})
    assert runners_used and set(runners_used) == {"static"}  # the server's decodes ran the runner it was given
    for choice, p in zip(sorted(r.choices, key=lambda ch: ch.index), [prompt, "x = "]):
        assert choice.text == engine_text(model, model.tokenizer.encode(p), 12)[0]
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        create_app(model, model_name=MODEL, config=ServeConfig(runner="cuda_graph"))
    with pytest.raises(ValueError, match="--runner must be one of"):
        ServeConfig(runner="fast")


def test_lone_surrogate_in_chat_is_a_400_naming_the_field(server):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "text", "text": "ok"}, {"type": "text", "text": "bad \ud83d end"}]}]}
    r = _post(server, body, path="/v1/chat/completions")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages.1.content.1.text" and "lone UTF-16 surrogate (\\ud83d)" in err["message"]
    # A proper surrogate pair is one character, and fine.
    r = _post(server, {"prompt": "emoji \ud83d\ude00", "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_seed_outside_int64_is_refused_at_the_request(server):
    r = _post(server, {"prompt": "x", "max_tokens": 4, "temperature": 1.0, "seed": 2 ** 63})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    for seed in (2 ** 63 - 1, -(2 ** 63)):
        assert _post(server, {"prompt": "x", "max_tokens": 4, "temperature": 1.0, "seed": seed}).status_code == 200


def test_steps_beyond_one_token_per_pass_decode_as_gen_length(server, model):
    """steps above gen_length add no pass (no mask is left to fill): the request is answered at
    once, with exactly the text of steps = gen_length, instead of looping over the steps."""
    t0 = time.monotonic()
    r = _post(server, {"prompt": "def f():", "max_tokens": 8, "steps": 200_000_000_000})
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 < 25
    assert r.json()["choices"][0]["text"] == engine_text(model, model.tokenizer.encode("def f():"), 8, steps=8)[0]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_health_is_503_while_the_engine_makes_no_progress(model, monkeypatch):
    import threading

    import diffcoder.engine.decoding as decode

    release = threading.Event()
    real = decode.block_schedule

    def stuck(masked, steps_per_block):  # a pass that never returns (until released)
        release.wait(60)
        return real(masked, steps_per_block)

    monkeypatch.setattr(decode, "block_schedule", stuck)
    app = create_app(model, model_name=MODEL, config=ServeConfig(stall_timeout=0.5))
    with BackgroundServer(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # idle: fine however long ago the last pass was
        done: list = []
        t = threading.Thread(target=lambda: done.append(_post(srv, {"prompt": "p", "max_tokens": 4})))
        t.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                h = httpx.get(srv.url + "/health")
                if h.status_code == 503:
                    break
                time.sleep(0.1)
            assert h.status_code == 503, h.text
            assert h.json()["status"] == "stalled" and "no progress" in h.json()["reason"]
        finally:
            release.set()
            t.join(30)
        assert done and done[0].status_code == 200
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_fields_openai_clients_send_are_accepted(server, model):
    """Bodies as LangChain / LiteLLM / editor plugins send them, over raw HTTP: honoured where
    possible, ignored (and named in a header) where harmless."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {}}}}]
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "top_p": 1, "n": 1,
            "stream": False, "store": False, "metadata": {"session": "abc"}, "parallel_tool_calls": True,
            "frequency_penalty": 0, "presence_penalty": 0, "user": "user-1", "response_format": {"type": "text"},
            "tools": tools, "tool_choice": "auto"}
    r = _post(server, body, path="/v1/chat/completions")
    assert r.status_code == 200, r.text
    rendered = [{"role": m["role"], "content": m["content"] or ""} for m in messages]
    ids = model.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    assert r.json()["choices"][0]["message"]["content"] == engine_text(model, ids, 8)[0]
    ignored = r.headers["x-diffcoder-ignored-fields"].split(", ")
    assert set(ignored) == {"metadata", "parallel_tool_calls", "tools", "user"}
    # top_p below 1 has nothing to act on when decoding greedily: ignored, same text as without it.
    r = _post(server, {"prompt": "x = ", "max_tokens": 8, "top_p": 0.95, "store": True, "tool_choice": "none"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == engine_text(model, model.tokenizer.encode("x = "), 8)[0]
    assert set(r.headers["x-diffcoder-ignored-fields"].split(", ")) == {"store", "top_p"}
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"prompt": "x = ", "max_tokens": 4, "stream": True, "store": True}) as s:
        assert s.status_code == 200 and s.headers["x-diffcoder-ignored-fields"] == "store"
        s.read()
    # Without any such field there is no header.
    assert "x-diffcoder-ignored-fields" not in _post(server, {"prompt": "x", "max_tokens": 4}).headers


def test_assistant_content_may_be_null_only_with_tool_calls(server):
    r = _post(server, {"messages": [{"role": "user", "content": None}]}, path="/v1/chat/completions")
    assert r.status_code == 400 and "only an assistant turn with tool_calls" in r.json()["error"]["message"]


def test_serve_loads_the_model_like_generate(tiny_model_dir, monkeypatch):
    """serve picks the device and dtype by the rule generate, chat and eval use (auto)."""
    import uvicorn

    import diffcoder.engine.cli as run_cli
    from diffcoder.cli import build_parser, main

    defaults = {cmd: build_parser().parse_args([cmd, *extra]) for cmd, extra in
                [("serve", []), ("generate", ["x"]), ("eval", ["humaneval", "--out", "o"])]}
    assert {(a.device, a.dtype) for a in defaults.values()} == {("auto", "auto")}
    loaded = []

    def fake_load(path, device="auto", dtype="auto"):
        loaded.append((str(path), device, dtype))
        return diffcoder.load(path)

    monkeypatch.setattr(run_cli, "load_auto", fake_load)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", "--model", str(tiny_model_dir)]) == 0
    assert main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]) == 0
    assert loaded == [(str(tiny_model_dir), "auto", "auto"), (str(tiny_model_dir), "cpu", "float32")]

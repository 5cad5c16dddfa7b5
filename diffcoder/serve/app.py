"""The FastAPI app: OpenAI-compatible routes, SSE streaming, errors, auth, metrics, playground.

`create_app(model, model_name=..., config=...)` builds an app around a loaded model; the
engine thread (see scheduler.py) starts and stops with the app's lifespan.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffcoder.serve.errors import APIError, error_body
from diffcoder.serve.generation import ModelInfo, Plan, RowText, plan_chat, plan_completion
from diffcoder.serve.metrics import CONTENT_TYPE, Metrics
from diffcoder.serve.protocol import ChatRequest, CompletionRequest
from diffcoder.serve.scheduler import BatchStats, Job, QueueFull, Scheduler, ServerStopping

log = logging.getLogger("diffcoder.serve")
IGNORED_HEADER = "x-diffcoder-ignored-fields"


@dataclass
class ServeConfig:
    max_batch: int = 8
    max_queue: int = 64
    request_timeout: float = 300.0
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    batch_window_s: float = 0.01
    runner: str = "auto"  # how each pass runs (diffcoder.runners.RUNNERS)
    stall_timeout: float = 120.0  # /health is 503 when the engine made no progress for this long with work

    def __post_init__(self) -> None:
        from diffcoder.config import RUNNERS

        if self.runner not in RUNNERS:
            raise ValueError(f"--runner must be one of {', '.join(RUNNERS)} (got {self.runner!r})")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1 (got {self.max_batch})")
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1 (got {self.max_queue})")
        if self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be positive seconds (got {self.request_timeout})")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be at least 1024 (got {self.max_body_bytes})")
        if self.stall_timeout <= 0:
            raise ValueError(f"--stall-timeout must be positive seconds (got {self.stall_timeout})")
        if not 0 <= self.batch_window_s <= 10:
            raise ValueError(f"--batch-window-ms must be within 0..10000 (got {self.batch_window_s * 1000:g})")


def create_app(model: Any, *, model_name: str, config: ServeConfig | None = None) -> FastAPI:
    from diffcoder.runners import make_runner

    cfg = config or ServeConfig()
    make_runner(model, 1, cfg.runner)  # a runner this device cannot run fails now, not in every request
    info = ModelInfo.from_model(model, model_name)
    holder: dict[str, Scheduler] = {}
    metrics = Metrics(
        queue_depth=lambda: holder["s"].queue_depth if "s" in holder else 0,
        running_rows=lambda: holder["s"].running_rows if "s" in holder else 0,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sched = Scheduler(
            model,
            eos_id=info.eos_id,
            max_batch=cfg.max_batch,
            max_queue=cfg.max_queue,
            batch_window_s=cfg.batch_window_s,
            on_batch=metrics.record_batch,
            runner=cfg.runner,
        )
        holder["s"] = sched
        app.state.scheduler = sched
        sched.start()
        try:
            yield
        finally:
            sched.stop()

    app = FastAPI(title="diffcoder", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.info = info
    app.state.config = cfg
    app.state.metrics = metrics
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(_CountRequests, metrics=metrics)
    _install_error_handlers(app)

    auth = _auth_dependency(cfg.api_key)

    @app.get("/health")
    async def health() -> Response:
        sched = holder.get("s")
        body: dict[str, Any] = {"status": "ok", "model": info.name, "queue_depth": sched.queue_depth if sched else 0}
        stalled = sched.stall(cfg.stall_timeout) if sched else None
        if stalled:
            return JSONResponse({**body, "status": "stalled", "reason": stalled}, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        page = resources.files("diffcoder.serve").joinpath("static/playground.html").read_text("utf-8")
        return HTMLResponse(page)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": info.name, "object": "model", "created": 0, "owned_by": "diffcoder",
                      "context_length": info.context_length, "chat": info.tokenizer.has_chat_template,
                      "generation_defaults": info.defaults}],
        }

    # Planning tokenizes the prompt: done in a worker thread so a long prompt never stalls the loop,
    # one at a time because a transformers tokenizer may adjust its (shared) settings per call.
    plan_lock = threading.Lock()

    def planned(fn: Any, body: Any) -> Plan:
        with plan_lock:
            return fn(body, info, _tag())

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(request, await asyncio.to_thread(planned, plan_completion, body), chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await _serve(request, await asyncio.to_thread(planned, plan_chat, body), chat=True)

    async def _serve(request: Request, plan: Plan, chat: bool) -> Response:
        sched = holder["s"]
        headers = {}
        if plan.ignored:
            log.info("%s: ignored field(s) without effect here: %s", request.url.path, ", ".join(plan.ignored))
            headers[IGNORED_HEADER] = ", ".join(plan.ignored)
        job = Job(prompts=plan.prompts, key=plan.key, want_steps=plan.want_steps, loop=asyncio.get_running_loop())
        try:
            sched.submit(job)
        except QueueFull as exc:
            raise APIError(429, "the server's queue is full; retry after the Retry-After seconds",
                           code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="n") from exc
        run = _Run(plan, job, info, sched, cfg.request_timeout, chat)
        try:
            first = await run.next_item(request)
        except BaseException:
            sched.withdraw(job)
            raise
        if first is None:  # the client left while waiting
            sched.withdraw(job)
            return Response(status_code=499)
        run.push_back(first)
        if plan.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        try:
            return JSONResponse(await run.collect(request), headers=headers)
        finally:
            sched.withdraw(job)

    return app


def _tag() -> int:
    return uuid.uuid4().int & 0xFFFFFFFF


class _Run:
    """Drives one job: reads engine events, keeps each row's text, formats OpenAI output."""

    def __init__(self, plan: Plan, job: Job, info: ModelInfo, sched: Scheduler, timeout: float, chat: bool) -> None:
        self.plan, self.job, self.info, self.sched, self.chat = plan, job, info, sched, chat
        self.rows = [RowText(info.tokenizer, info.eos_id, plan.max_tokens, plan.stop) for _ in plan.prompts]
        self.deadline = job.submitted + timeout
        self.timeout = timeout
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.stats: BatchStats | None = None
        self.steps_seen = [0] * len(self.rows)
        self.started = time.perf_counter()
        self._back: list[tuple] = []

    # -- reading the engine's queue ---------------------------------------------------------
    def push_back(self, item: tuple) -> None:
        self._back.append(item)

    async def next_item(self, request: Request | None = None) -> tuple | None:
        """The next engine item; None if the client disconnected; APIError 408 on timeout."""
        if self._back:
            return self._back.pop()
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise APIError(408, f"the request did not finish within the server's {self.timeout:g}s "
                                    "request timeout; lower max_tokens or steps, or retry when the server is less busy",
                               code="timeout")
            try:
                # Short waits let a waiting handler notice a client that went away.
                return await asyncio.wait_for(self.job.queue.get(), min(left, 0.5 if request else left))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    return None

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple]:
        """Yields ("step", row, ev) and ("delta", row, text); returns when every row is done."""
        while not self.all_done():
            item = await self.next_item(request)
            if item is None:
                return
            kind = item[0]
            if kind == "error":
                exc = item[1]
                if isinstance(exc, ValueError):
                    raise APIError(400, f"the decoder rejected the settings: {exc}")
                if isinstance(exc, ServerStopping):
                    raise APIError(503, str(exc), code="shutting_down")
                raise APIError(500, "internal error while decoding; see the server log")
            if kind == "done":
                self.stats = item[1]
                for r, row in enumerate(self.rows):
                    if row.finish_reason is None:  # the engine ended the row without a final block
                        yield ("delta", r, row.add_block([], True, "length"))
                return
            r = item[1]
            if kind == "step":
                self.steps_seen[r] += 1
                yield ("step", r, item[2])
            elif kind == "block":
                ev = item[2]
                delta = self.rows[r].add_block(list(ev.tokens), bool(ev.finished), ev.finish_reason)
                if self.rows[r].finish_reason is not None:
                    self.job.cancel_row(r)  # stop string or max_tokens: stop spending compute on it
                yield ("delta", r, delta)
        if self.plan.want_steps and self.stats is None:
            # The playground shows forward passes: wait for the batch's totals.
            while True:
                item = await self.next_item(request)
                if item is None or item[0] in ("done", "error"):
                    self.stats = item[1] if item and item[0] == "done" else None
                    return

    def all_done(self) -> bool:
        return all(row.finish_reason is not None for row in self.rows)

    # -- output -----------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        done = sum(row.completion_tokens for row in self.rows)
        return {"prompt_tokens": self.plan.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.plan.prompt_tokens + done}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.info.name}

    async def collect(self, request: Request) -> dict[str, Any]:
        async for _ in self.events(request):
            pass
        if not self.all_done():  # client disconnected; nobody will read this
            return {}
        choices = []
        for r, row in enumerate(self.rows):
            if self.chat:
                choices.append({"index": r, "message": {"role": "assistant", "content": row.text},
                                "logprobs": None, "finish_reason": row.finish_reason})
            else:
                choices.append({"index": r, "text": self.plan.echo_texts[r] + row.text, "logprobs": None,
                                "finish_reason": row.finish_reason})
        out = self._head("chat.completion" if self.chat else "text_completion")
        out.update(choices=choices, usage=self.usage())
        return out

    def _chunk(self, r: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": r, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            if first:
                text = self.plan.echo_texts[r] + text
            choice = {"index": r, "text": text, "logprobs": None, "finish_reason": finish}
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = [choice]
        return out

    async def sse(self) -> AsyncIterator[str]:
        first = [True] * len(self.rows)
        try:
            if self.plan.want_steps:
                yield _sse(self._start_event())
            async for kind, r, payload in self.events():
                if kind == "step":
                    yield _sse(self._step_event(r, payload))
                    continue
                yield _sse(self._chunk(r, payload, self.rows[r].finish_reason, first[r]))
                first[r] = False
            if self.plan.want_steps:
                yield _sse(self._stats_event())
            if self.plan.include_usage:
                out = self._head("chat.completion.chunk" if self.chat else "text_completion")
                out.update(choices=[], usage=self.usage())
                yield _sse(out)
            yield "data: [DONE]\n\n"
        except APIError as exc:
            yield _sse(exc.body())
        finally:
            # Also runs when the client disconnects (the response task is cancelled):
            # the engine drops this job's rows at the next block.
            self.sched.withdraw(self.job)

    # -- playground extension events --------------------------------------------------------
    def _start_event(self) -> dict[str, Any]:
        k = self.plan.key
        return {"object": "diffcoder.denoise.start", "id": self.id, "gen_length": k.gen_length,
                "max_tokens": self.plan.max_tokens, "block_length": k.block_length, "steps": k.steps,
                "threshold": k.threshold, "prompt_tokens": [len(p) for p in self.plan.prompts]}

    def _step_event(self, r: int, ev: Any) -> dict[str, Any]:
        tok = self.info.tokenizer
        tokens = [int(t) for t in ev.tokens]
        return {"object": "diffcoder.denoise.step", "index": r, "step": self.steps_seen[r],
                "block_index": int(ev.block_index), "positions": [int(p) for p in ev.positions],
                "tokens": tokens, "texts": [tok.decode([t]) for t in tokens],
                "confidences": [round(float(c), 4) for c in ev.confidences]}

    def _stats_event(self) -> dict[str, Any]:
        tokens = sum(row.completion_tokens for row in self.rows)
        seconds = self.stats.seconds if self.stats else time.perf_counter() - self.started
        nfe = self.stats.nfe if self.stats else sum(self.steps_seen)
        per_row = tokens / max(1, len(self.rows))
        return {"object": "diffcoder.denoise.stats", "id": self.id, "completion_tokens": tokens,
                "seconds": round(seconds, 4), "forward_passes": nfe,
                "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
                "forward_passes_per_token": round(nfe / per_row, 3) if per_row else None,
                "texts": [row.text for row in self.rows],
                "answer_tokens": [row.completion_tokens for row in self.rows]}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- auth, errors, limits, metrics ----------------------------------------------------------

def _auth_dependency(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>' with the key "
                                "the server was started with (--api-key)", code="invalid_api_key")
    return check


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    surrogate = next((e for e in errors if e.get("type") == "lone_surrogate"), None)
    if surrogate is not None:
        # Reported alone: for a union field pydantic also lists every alternative that did not match.
        name = ".".join(str(p) for p in surrogate["loc"] if p != "body" and not _is_type_tag(str(p))) or "body"
        return (f"'{name}' {surrogate['msg']}: JSON text must be valid Unicode; send a character outside the "
                "Basic Multilingual Plane as a surrogate pair (high then low), or as UTF-8"), name
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        ctx = err.get("ctx") or {}
        return f"the request body is not valid JSON ({ctx.get('error', err.get('msg'))}); send a JSON object", None
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object", None
    if kind == "missing" and not loc:
        return "the request body is empty; send a JSON object", None
    field_name = ".".join(loc) or "body"
    tag = next((i for i, part in enumerate(loc) if _is_type_tag(part)), None)
    if tag and loc[tag - 1] in _UNION_FIELDS:
        # A union field: pydantic reports one error per alternative; say what is accepted instead.
        name = ".".join(loc[:tag])
        got = err.get("input")
        shown = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
        return f"'{name}' must be {_UNION_FIELDS[loc[tag - 1]]} (got {shown})", name
    if kind == "missing":
        return f"'{field_name}' is required", field_name
    if kind == "extra_forbidden":
        return f"unknown field '{field_name}'; check the spelling (see docs/serving.md for the accepted fields)", field_name
    got = err.get("input")
    shown = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
    extra = f" ({len(errors) - 1} more problem(s) in the body)" if len(errors) > 1 else ""
    return f"'{field_name}': {err.get('msg', 'invalid value')} (got {shown}){extra}", field_name


# Fields whose type is a union, and what to tell a client who sent something else.
_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "logprobs": "a boolean or an integer",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
}


def _is_type_tag(part: str) -> bool:
    """pydantic names each alternative of a union in `loc` by its type: `str`, `list[int]`, ..."""
    return part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper()


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; see docs/serving.md for the endpoints",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        code = "body_too_large" if exc.status_code == 413 else None
        return JSONResponse(error_body(exc.status_code, message, code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, "internal server error; see the server log"), status_code=500)


class _CountRequests:
    """Pure ASGI middleware (keeps streaming and disconnects untouched): requests by status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def spy(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, spy)
        finally:
            self.metrics.record_request(scope.get("path", ""), status["code"])


class _BodyLimit:
    """Pure ASGI middleware: 413 for bodies over `max_bytes` (declared or actually sent)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes through FastAPI's body reading unchanged.
                    raise HTTPException(413, detail=self._error().message)
            return message

        await self.app(scope, limited, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes; "
                             "send a shorter prompt or start the server with a larger --max-body-bytes",
                        code="body_too_large")

    async def _reject(self, send: Any) -> None:
        resp = JSONResponse(self._error().body(), status_code=413)
        await resp({"type": "http"}, None, send)

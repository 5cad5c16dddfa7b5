"""The FastAPI app: OpenAI-compatible routes, errors, auth, metrics, playground.

`create_app(model, model_name=..., config=...)` builds an app around a loaded model; the
engine thread (see scheduler.py) starts and stops with the app's lifespan. A generation
request's response (SSE or JSON) is made in stream.py.
"""
from __future__ import annotations

import asyncio
import secrets
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffcoder.serve.errors import APIError, error_body
from diffcoder.serve.generation import ModelInfo, Plan, plan_chat, plan_completion
from diffcoder.serve.metrics import CONTENT_TYPE, Metrics
from diffcoder.serve.middleware import BodyLimit, CountRequests
from diffcoder.serve.protocol import ChatRequest, CompletionRequest
from diffcoder.serve.scheduler import Scheduler
from diffcoder.serve.stream import respond
from diffcoder.serve.validation import validation_message


@dataclass
class ServeConfig:
    max_batch: int = 8
    max_queue: int = 64
    request_timeout: float = 300.0
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    batch_window_s: float = 0.01
    runner: str = "auto"  # how each pass runs (diffcoder.engine.runners.RUNNERS)
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
    from diffcoder.engine.runners import make_runner

    cfg = config or ServeConfig()
    make_runner(model, 1, cfg.runner)  # a runner this device cannot run fails now, not in every request
    info = ModelInfo.from_model(model, model_name)
    engine = _Engine(model, info, cfg)
    app = FastAPI(title="diffcoder", lifespan=engine.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.info = info
    app.state.config = cfg
    app.state.metrics = engine.metrics
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(CountRequests, metrics=engine.metrics)
    _install_error_handlers(app)
    auth = _auth_dependency(cfg.api_key)
    _add_info_routes(app, engine, auth)
    _add_generation_routes(app, engine, auth)
    return app


class _Engine:
    """The model's scheduler while the app runs (started and stopped by the app's lifespan), and its metrics."""

    def __init__(self, model: Any, info: ModelInfo, cfg: ServeConfig) -> None:
        self.model, self.info, self.cfg = model, info, cfg
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics(queue_depth=lambda: self.scheduler.queue_depth if self.scheduler else 0,
                               running_rows=lambda: self.scheduler.running_rows if self.scheduler else 0)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        cfg = self.cfg
        sched = Scheduler(self.model, eos_id=self.info.eos_id, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                          batch_window_s=cfg.batch_window_s, on_batch=self.metrics.record_batch, runner=cfg.runner)
        self.scheduler = sched
        app.state.scheduler = sched
        sched.start()
        try:
            yield
        finally:
            sched.stop()


def _add_info_routes(app: FastAPI, engine: _Engine, auth: Callable[[Request], Awaitable[None]]) -> None:
    """/health, /metrics, the playground page and /v1/models."""
    info = engine.info

    @app.get("/health")
    async def health() -> Response:
        sched = engine.scheduler
        body: dict[str, Any] = {"status": "ok", "model": info.name, "queue_depth": sched.queue_depth if sched else 0}
        stalled = sched.stall(engine.cfg.stall_timeout) if sched else None
        if stalled:
            return JSONResponse({**body, "status": "stalled", "reason": stalled}, status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

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


def _add_generation_routes(app: FastAPI, engine: _Engine, auth: Callable[[Request], Awaitable[None]]) -> None:
    """/v1/completions and /v1/chat/completions."""
    # Planning tokenizes the prompt: done in a worker thread so a long prompt never stalls the loop,
    # one at a time because a transformers tokenizer may adjust its (shared) settings per call.
    plan_lock = threading.Lock()

    def planned(fn: Callable[[Any, ModelInfo, int], Plan], body: Any) -> Plan:
        with plan_lock:
            return fn(body, engine.info, uuid.uuid4().int & 0xFFFFFFFF)

    async def serve(request: Request, plan: Plan, chat: bool) -> Response:
        return await respond(request, plan, chat, engine.scheduler, engine.info, engine.cfg.request_timeout)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serve(request, await asyncio.to_thread(planned, plan_completion, body), chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await serve(request, await asyncio.to_thread(planned, plan_chat, body), chat=True)


# -- auth, errors ---------------------------------------------------------------------------

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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
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

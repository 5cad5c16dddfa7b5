"""Pure ASGI middleware (streaming and disconnects pass untouched): request counts, body size limit."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from diffcoder.serve.errors import APIError
from diffcoder.serve.metrics import Metrics


class _HTTPMiddleware(ABC):
    """Applies `http()` to HTTP requests; other scopes (lifespan) go straight to the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    @abstractmethod
    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        """Handle one HTTP request (calling `self.app` to pass it on)."""


class CountRequests(_HTTPMiddleware):
    """Requests by path and response status, into the metrics."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        status = {"code": 500}

        async def spy(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, spy)
        finally:
            self.metrics.record_request(scope.get("path", ""), status["code"])


class BodyLimit(_HTTPMiddleware):
    """413 for bodies over `max_bytes` (declared or actually sent)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def http(self, scope: dict, receive: Any, send: Any) -> None:
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

"""One generation request's response: the planned job goes to the engine, and its events come
back as server-sent events (`stream: true`) or as one JSON body.

The job is withdrawn from the engine however the response ends (finished, failed, timed out,
or the client went away), so no compute is spent on rows nobody reads.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from diffcoder.serve.errors import APIError
from diffcoder.serve.generation import ModelInfo, Plan, RowText
from diffcoder.serve.responses import ResponseFormat
from diffcoder.serve.scheduler import BatchStats, Job, QueueFull, Scheduler, ServerStopping

log = logging.getLogger("diffcoder.serve")
IGNORED_HEADER = "x-diffcoder-ignored-fields"
CLIENT_CHECK_S = 0.5  # how often a waiting handler looks whether its client went away


async def respond(request: Request, plan: Plan, chat: bool, sched: Scheduler, info: ModelInfo,
                  timeout: float) -> Response:
    """Submit the plan's job and answer with its output; 499 when the client left before any."""
    headers = _ignored_fields(request, plan)
    job = Job(prompts=plan.prompts, key=plan.key, want_steps=plan.want_steps, loop=asyncio.get_running_loop())
    _submit(sched, job)
    events = JobEvents(plan, job, info, sched, timeout)
    fmt = ResponseFormat(plan, info, chat)
    try:
        first = await events.next_item(request)
    except BaseException:
        events.withdraw()
        raise
    if first is None:  # the client left while waiting
        events.withdraw()
        return Response(status_code=499)
    events.push_back(first)
    if plan.stream:
        return StreamingResponse(sse_stream(events, fmt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    try:
        return JSONResponse(await collect(events, fmt, request), headers=headers)
    finally:
        events.withdraw()


def _ignored_fields(request: Request, plan: Plan) -> dict[str, str]:
    """The response header naming request fields that had no effect (logged too)."""
    if not plan.ignored:
        return {}
    log.info("%s: ignored field(s) without effect here: %s", request.url.path, ", ".join(plan.ignored))
    return {IGNORED_HEADER: ", ".join(plan.ignored)}


def _submit(sched: Scheduler, job: Job) -> None:
    try:
        sched.submit(job)
    except QueueFull as exc:
        raise APIError(429, "the server's queue is full; retry after the Retry-After seconds",
                       code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param="n") from exc


async def collect(events: JobEvents, fmt: ResponseFormat, request: Request) -> dict[str, Any]:
    """The whole response, once every row is done ({} when the client left: nobody reads it)."""
    async for _ in events.events(request):
        pass
    if not events.all_done():
        return {}
    return fmt.response(events.rows)


async def sse_stream(events: JobEvents, fmt: ResponseFormat) -> AsyncIterator[str]:
    """Server-sent events: text chunks per row (and the playground's denoising events when asked
    for), usage when asked for, then [DONE]; an error mid-stream is the last event."""
    plan = events.plan
    first = [True] * len(events.rows)
    try:
        if plan.want_steps:
            yield _sse(fmt.denoise_start())
        async for kind, r, payload in events.events():
            if kind == "step":
                yield _sse(fmt.denoise_step(r, events.steps_seen[r], payload))
                continue
            yield _sse(fmt.chunk(r, payload, events.rows[r].finish_reason, first[r]))
            first[r] = False
        if plan.want_steps:
            yield _sse(fmt.denoise_stats(events.rows, events.seconds(), events.forward_passes()))
        if plan.include_usage:
            yield _sse(fmt.usage_chunk(events.rows))
        yield "data: [DONE]\n\n"
    except APIError as exc:
        yield _sse(exc.body())
    finally:
        # Also runs when the client disconnects (the response task is cancelled):
        # the engine drops this job's rows at the next block.
        events.withdraw()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class JobEvents:
    """One job's engine items, read from its queue into each row's text: yields text deltas and
    denoising steps, and keeps the totals."""

    def __init__(self, plan: Plan, job: Job, info: ModelInfo, sched: Scheduler, timeout: float) -> None:
        self.plan, self.job, self.sched, self.timeout = plan, job, sched, timeout
        self.rows = [RowText(info.tokenizer, info.eos_id, plan.max_tokens, plan.stop) for _ in plan.prompts]
        self.deadline = job.submitted + timeout
        self.stats: BatchStats | None = None
        self.steps_seen = [0] * len(self.rows)
        self.started = time.perf_counter()
        self._back: list[tuple] = []

    def withdraw(self) -> None:
        self.sched.withdraw(self.job)

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
                return await asyncio.wait_for(self.job.queue.get(), min(left, CLIENT_CHECK_S if request else left))
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
                raise _engine_error(item[1])
            if kind == "done":
                self.stats = item[1]
                for r, row in enumerate(self.rows):
                    if row.finish_reason is None:  # the engine ended the row without a final block
                        yield ("delta", r, row.add_block([], True, "length"))
                return
            if kind == "step":
                self.steps_seen[item[1]] += 1
                yield ("step", item[1], item[2])
            elif kind == "block":
                yield ("delta", item[1], self._add_block(item[1], item[2]))
        if self.plan.want_steps and self.stats is None:
            await self._wait_for_totals(request)  # the playground shows forward passes: the batch's totals

    def _add_block(self, r: int, ev: Any) -> str:
        delta = self.rows[r].add_block(list(ev.tokens), bool(ev.finished), ev.finish_reason)
        if self.rows[r].finish_reason is not None:
            self.job.cancel_row(r)  # stop string or max_tokens: stop spending compute on it
        return delta

    async def _wait_for_totals(self, request: Request | None) -> None:
        while True:
            item = await self.next_item(request)
            if item is None or item[0] in ("done", "error"):
                self.stats = item[1] if item and item[0] == "done" else None
                return

    def all_done(self) -> bool:
        return all(row.finish_reason is not None for row in self.rows)

    def seconds(self) -> float:
        return self.stats.seconds if self.stats else time.perf_counter() - self.started

    def forward_passes(self) -> int:
        return self.stats.nfe if self.stats else sum(self.steps_seen)


def _engine_error(exc: BaseException) -> APIError:
    """What the client is told when decoding failed."""
    if isinstance(exc, ValueError):
        return APIError(400, f"the decoder rejected the settings: {exc}")
    if isinstance(exc, ServerStopping):
        return APIError(503, str(exc), code="shutting_down")
    return APIError(500, "internal error while decoding; see the server log")

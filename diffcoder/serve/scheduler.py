"""The batch scheduler: one engine thread owns the model, asyncio handlers submit jobs.

Why a thread: a decode step is a blocking torch call (which releases the GIL), so running it
on the event loop would freeze every other request, `/health` included. The engine thread
takes the oldest waiting job, adds every waiting job with the same `BatchKey` (same decoder
settings, so one `Decoding` can run them as rows of one batch) up to `max_batch` rows, and
runs the batch, handing each event to its job's asyncio queue with `call_soon_threadsafe`.
Jobs with other settings wait for a later batch (FIFO by their oldest member).

Cancellation (client gone, stop string seen, timeout) is a flag the handler sets; the engine
looks at the flags after every event and calls `Decoding.cancel(row)`, so the row stops
costing compute at the next block, and a batch whose rows are all cancelled ends at once.

Watchdog: the engine stamps `last_progress` whenever it starts a batch, hands out an event
(a committed block, or a denoising step) or ends a batch; `stall()` says when work is waiting
or running and that stamp is older than the stall limit, which `/health` reports as 503.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("diffcoder.serve")


@dataclass(frozen=True)
class BatchKey:
    """Decoder settings; only jobs with equal keys share a `Decoding` batch."""

    gen_length: int
    steps: int
    block_length: int
    threshold: float | None
    remasking: str
    temperature: float
    shift: bool
    speculative: bool = False
    # Sampling draws noise for the whole batch from one generator, so a seeded sampled job
    # would get different samples depending on its batch mates. Such jobs run alone
    # (`solo` = the job id) to keep `seed` reproducible; greedy jobs batch freely.
    seed: int | None = None
    solo: int | None = None

    def decoder_kwargs(self) -> dict[str, Any]:
        return {
            "gen_length": self.gen_length,
            "steps": self.steps,
            "block_length": self.block_length,
            "threshold": self.threshold,
            "remasking": self.remasking,
            "temperature": self.temperature,
            "shift": self.shift,
            "seed": self.seed,
            "speculative": self.speculative,
        }


class ServerStopping(Exception):
    """Posted to jobs still waiting or running when the server shuts down."""


class QueueFull(Exception):
    """The waiting queue is at `max_queue`; the client should retry after `retry_after` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after}s")
        self.retry_after = retry_after


_job_ids = itertools.count(1)


@dataclass
class Job:
    """One request: `prompts` are its rows (prompts x n); events arrive on `queue`.

    Items put on the queue: ("step", row, StepEvent), ("block", row, BlockEvent),
    ("done", BatchStats), ("error", Exception).
    """

    prompts: list[list[int]]
    key: BatchKey
    want_steps: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_job_ids))
    submitted: float = field(default_factory=time.monotonic)
    _cancelled_rows: set[int] = field(default_factory=set)
    _cancelled: bool = False

    # -- called from the asyncio side -------------------------------------------------------
    def cancel_row(self, row: int) -> None:
        self._cancelled_rows.add(row)  # a set add is atomic under the GIL

    def cancel(self) -> None:
        self._cancelled = True

    # -- called from the engine thread ------------------------------------------------------
    def row_cancelled(self, row: int) -> bool:
        return self._cancelled or row in self._cancelled_rows

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def post(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


@dataclass
class BatchStats:
    rows: int
    nfe: int
    tokens: int
    seconds: float


class Scheduler:
    """Owns the engine thread and the waiting queue."""

    def __init__(
        self,
        model: Any,
        *,
        eos_id: int | None,
        max_batch: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.01,
        on_batch: Callable[[BatchStats], None] | None = None,
        runner: str = "auto",
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.runner = runner
        self.model = model
        self.eos_id = eos_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.on_batch = on_batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.running_rows = 0
        self._running: list[Job] = []
        self._posted = False  # whether the running batch has handed out any event yet
        self._avg_batch_s = 1.0  # for Retry-After; updated after every batch
        self.last_progress = time.monotonic()  # the watchdog's stamp (see the module docstring)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="diffcoder-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job (their handlers get a ServerStopping error) and end the thread."""
        with self._cond:
            self._stopping = True
            for job in [*self._pending, *self._running]:
                job.cancel()
                job.post(("error", ServerStopping("the server is shutting down; retry on another replica or later")))
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- asyncio side -----------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def stall(self, limit_s: float) -> str | None:
        """Why the engine counts as stuck (its thread died, or no progress for `limit_s` seconds
        while requests wait or run), or None when it is idle or making progress."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return "the engine thread has stopped; see the server log and restart the server"
        waiting, rows = len(self._pending), self.running_rows
        quiet = time.monotonic() - self.last_progress
        if (waiting or rows) and quiet > limit_s:
            return (f"the engine has made no progress for {quiet:.0f}s (limit {limit_s:g}s) with {rows} row(s) "
                    f"running and {waiting} request(s) waiting; see the server log, and restart the server "
                    "if it does not recover")
        return None

    def submit(self, job: Job) -> None:
        """Queue a job or raise `QueueFull`; never blocks."""
        if len(job.prompts) > self.max_batch:
            raise ValueError(
                f"this request needs {len(job.prompts)} rows (prompts x n) but the server "
                f"batches at most {self.max_batch}; lower n or send fewer prompts"
            )
        with self._cond:
            if self._stopping:
                raise QueueFull(retry_after=5)
            if len(self._pending) >= self.max_queue:
                raise QueueFull(retry_after=max(1, round(self._avg_batch_s)))
            if not self._pending and not self.running_rows:
                self.last_progress = time.monotonic()  # an idle engine starts its clock now
            self._pending.append(job)
            self._cond.notify_all()

    def withdraw(self, job: Job) -> None:
        """Cancel a job; if it is still waiting, it leaves the queue now."""
        job.cancel()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass  # already running (the engine sees the flag) or finished

    # -- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._stopping and not self._pending:
                self._cond.wait()
            if self._stopping:
                return None
            # A short window lets requests that arrive together share the first batch.
            deadline = self._pending[0].submitted + self.batch_window_s
            while not self._stopping and sum(len(j.prompts) for j in self._pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._stopping or not self._pending:
                return None if self._stopping else []
            first = self._pending.popleft()
            batch, rows, rest = [first], len(first.prompts), deque()
            for job in self._pending:
                if job.key == first.key and rows + len(job.prompts) <= self.max_batch:
                    batch.append(job)
                    rows += len(job.prompts)
                else:
                    rest.append(job)
            self._pending = rest
            self.running_rows = rows
            return batch

    def _run_batch(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            self.running_rows = 0
            return
        self._running = jobs
        self._posted = False
        self.last_progress = time.monotonic()
        try:
            stats = self._decode(jobs)
        except Exception as exc:  # noqa: BLE001 - reported to the jobs, never kills the thread
            if len(jobs) > 1 and isinstance(exc, ValueError) and not self._posted:
                # One job's settings upset the engine before any output: run each job alone
                # so the others still finish.
                for job in jobs:
                    self._run_batch([job])
                return
            if not isinstance(exc, ValueError):
                log.exception("decode failed")
            for job in jobs:
                job.post(("error", exc))
            return
        finally:
            self.running_rows = 0
            self._running = []
            self.last_progress = time.monotonic()
        self._avg_batch_s = 0.8 * self._avg_batch_s + 0.2 * stats.seconds
        if self.on_batch is not None:
            self.on_batch(stats)
        for job in jobs:
            job.post(("done", stats))

    def _decode(self, jobs: list[Job]) -> BatchStats:
        from diffcoder.engine.decoding import Decoding, StepEvent

        owners: list[tuple[Job, int]] = []
        prompts: list[list[int]] = []
        for job in jobs:
            for r, p in enumerate(job.prompts):
                owners.append((job, r))
                prompts.append(p)
        t0 = time.perf_counter()
        dec = Decoding(
            self.model,
            prompts,
            eos_id=self.eos_id,
            step_events=any(j.want_steps for j in jobs),
            runner=self.runner,
            **jobs[0].key.decoder_kwargs(),
        )
        live = set(range(len(prompts)))
        tokens = 0
        for ev in dec:
            self._posted = True
            self.last_progress = time.monotonic()
            job, r = owners[ev.row]
            if isinstance(ev, StepEvent):
                if job.want_steps and ev.row in live:
                    job.post(("step", r, ev))
            elif ev.row in live:
                tokens += len(ev.tokens)
                job.post(("block", r, ev))
                if ev.finished:
                    live.discard(ev.row)
            for g in [g for g in live if owners[g][0].row_cancelled(owners[g][1])]:
                dec.cancel(g)
                live.discard(g)
            if not live:
                break  # every row is done or cancelled: free the engine now
        return BatchStats(rows=len(prompts), nfe=_nfe(dec), tokens=tokens, seconds=time.perf_counter() - t0)


def _nfe(dec: Any) -> int:
    """Forward passes the batch used so far (the result exists only after a full iteration)."""
    for name in ("nfe",):
        value = getattr(dec, name, None)
        if isinstance(value, int):
            return value
    try:
        return int(dec.result.nfe)
    except Exception:  # noqa: BLE001 - iteration was cut short, no result
        return 0

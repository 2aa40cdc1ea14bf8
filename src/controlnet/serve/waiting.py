"""How a request handler does its work and waits for its job without starving the server.

Two kinds of waiting must never share one pool: CPU work a request needs before or after its job (decoding images,
encoding PNGs) and the long waits on a job (a synchronous generate, an event stream). The anchors run both on the
thread pool of the framework (40 threads): 60 clients streaming a queued job's events held every thread, and
health, annotate and every other synchronous route got no answer for 30 s. Here:
- a request's CPU work runs on `off_loop`, a pool of WORK_THREADS threads of its own, so a burst of big uploads
  cannot take the threads the cheap synchronous routes run on;
- waits hold no thread at all: `Job.changed` (serve/service.py) is an awaitable woken by the worker;
- a waiting request notices its client going away and cancels its job (native and web-UI alike), so a client that
  gives up frees the queue.
"""

from __future__ import annotations

import anyio
from fastapi import Request

from controlnet.serve.problems import ApiError
from controlnet.serve.service import Job, Service

WORK_THREADS = (
    4  # threads for requests' decoding and encoding; more requests wait for one (bounded by the body limit)
)
POLL_S = 0.25  # how often a waiting request checks whether its client went away
_limiter: anyio.CapacityLimiter | None = None


def _work_limiter() -> anyio.CapacityLimiter:
    global _limiter  # created on first use: a CapacityLimiter belongs to the running event loop's backend
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(WORK_THREADS)
    return _limiter


async def off_loop(function, *args):
    """`function(*args)` on the request-work pool (never on the event loop, never on the framework's pool)."""
    return await anyio.to_thread.run_sync(function, *args, limiter=_work_limiter())


async def wait_done(job: Job, request: Request, service: Service) -> None:
    """Wait until `job` is finished while its client is there; a client that goes away cancels its job (409)."""
    version = -1
    while not job.done:
        version = await job.changed(version, POLL_S)
        if not job.done and await request.is_disconnected():
            service.cancel(job.id)
            raise ApiError(409, f"job {job.id}: the client disconnected; cancelled")

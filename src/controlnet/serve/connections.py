"""Connections: a deadline for each request's headers and body, and a cap on open connections.

uvicorn (tested with 0.55) reads every connection with one asyncio protocol object, and has neither of these:
- no timeout while it waits for a request: a client that opens a socket and sends half a request line (or half a
  body) holds a file descriptor for ever ("slowloris"). Its keep-alive timer only starts after a response.
- no cap on connections: `limit_concurrency` counts requests whose headers have arrived, so it never sees a
  half-sent one. About 21,000 of them used up the process's file descriptors and /v1/health stopped answering.

`protocol_class(limits)` gives uvicorn's h11 protocol with both, passed as `uvicorn.Config(http=...)` (the
documented way to choose the protocol class). Per connection:
1. When it opens (and after each response, for the next request on a kept-alive connection) a timer of
   `header_timeout_s` starts. A request whose line and headers have not all arrived by then is answered 408 (or,
   if not one byte arrived, just closed, as browsers' unused pre-opened sockets are) and closed.
2. Once the headers are in, a body must keep coming: a pause of more than `body_timeout_s` between two chunks
   closes the connection (408 if the app has not answered yet; the app sees a disconnect).
3. Once the request is whole, no timer runs: a generation or an event stream may take as long as it takes.

The cap is checked when a connection opens, before any byte is read. At `max_connections` the oldest connection
that has been waiting for its request headers longer than EVICT_MIN_AGE_S is closed to make room (a stalled client,
or an idle kept-alive one, which clients reopen); if none has, the new connection is answered 503 and closed at
once. Connections in the middle of a request (a job's event stream, a generation, an upload) are never touched.

Each connection costs a file descriptor: `raise_fd_limit` lifts the process's soft limit towards the hard limit so
that the cap, not the kernel, refuses first.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass, field
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from controlnet.serve.problems import PROBLEM_JSON, problem_body

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 8192
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
# file descriptors kept for everything but client sockets: the listening socket, model files being read, gradio's
# uploads, torch's and the event loop's pipes, log files
FD_RESERVE = 256
# a connection younger than this is never evicted: in a burst the newest arrivals are refused instead, so that a
# client that connected a moment ago gets to send its request
EVICT_MIN_AGE_S = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """What `controlnet serve` allows per connection and in all (the --max-connections, --*-timeout flags)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Open client connections at most; see the module docstring for what happens at the cap."""
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    """Seconds a client has to send a request's line and headers (from connecting, or from the last response)."""
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    """Longest pause, in seconds, between two pieces of a request body."""

    def __post_init__(self):
        if self.max_connections < 1:
            raise ValueError(f"--max-connections {self.max_connections}: expected an integer >= 1")
        for name in ("header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise ValueError(f"{flag} {value}: expected a positive number of seconds")


@dataclass
class ConnectionGuard:
    """State shared by all connections of one server: the limits, who waits for headers, and what was refused."""

    limits: ConnectionLimits
    # connections waiting for a request's headers -> when they started waiting; insertion order = oldest first
    waiting: dict = field(default_factory=dict)
    refused: int = 0
    evicted: int = 0
    header_timeouts: int = 0
    body_timeouts: int = 0

    def make_room(self, now: float) -> bool:
        """Close the oldest connection waiting for headers (if it is old enough to be stalled); True if one was."""
        for protocol, since in self.waiting.items():
            if now - since < EVICT_MIN_AGE_S:
                return False  # the oldest is young: so are all the others
            self.evicted += 1
            protocol.close_waiting()  # removes it from `waiting`
            return True
        return False


def _raw_response(status: int, detail: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written outside h11 (no request may have been read)."""
    body = json.dumps(problem_body(status, detail)).encode()
    head = [f"HTTP/1.1 {status} {problem_body(status, '')['title']}", f"content-type: {PROBLEM_JSON}"]
    head += [f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and the cap of the module docstring."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._timer = None  # asyncio.TimerHandle of the running deadline
        self._phase = None  # "headers", "body" or None (the request is whole, or the connection is closed)
        self._partial = False  # bytes of the awaited request's line/headers have arrived
        self._refused = False

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        guard = self.guard
        if len(self.connections) >= guard.limits.max_connections and not guard.make_room(self.loop.time()):
            guard.refused += 1
            self._refused = True
            logger.warning(
                "connection refused: %d connections open (--max-connections %d)",
                len(self.connections),
                guard.limits.max_connections,
            )
            transport.write(SERVICE_UNAVAILABLE)
            transport.close()
            return
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._phase == "headers":
            self._partial = True
        super().data_received(data)
        self._follow_request(progress=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return  # it never became one of uvicorn's connections
        self._stop_timer()
        super().connection_lost(exc)

    # uvicorn's hook: a response has been sent (the next request on this connection may start)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow_request(progress=False)

    # the deadlines

    def _follow_request(self, progress: bool) -> None:
        """Start, renew or stop the deadline after h11 has read what arrived (h11's state of the client)."""
        if self.transport.is_closing():
            self._stop_timer()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._phase != "headers":
                self._await_headers()
        elif state is h11.SEND_BODY:
            if self._phase != "body" or progress:
                self._stop_timer()
                self._phase = "body"
                self._timer = self.loop.call_later(self.guard.limits.body_timeout_s, self._timed_out)
        else:  # the request is whole (or the connection is switching protocol, or closing): no deadline
            self._stop_timer()

    def _await_headers(self) -> None:
        self._stop_timer()
        self._phase, self._partial = "headers", False
        self.guard.waiting[self] = self.loop.time()
        self._timer = self.loop.call_later(self.guard.limits.header_timeout_s, self._timed_out)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.waiting.pop(self, None)
        self._phase = None

    def _timed_out(self) -> None:
        self._timer = None
        phase, guard = self._phase, self.guard
        if phase == "body" and self.flow.read_paused:
            # the server, not the client, has stopped the body (back-pressure while the app catches up): wait again
            self._timer = self.loop.call_later(guard.limits.body_timeout_s, self._timed_out)
            return
        if phase == "headers":
            guard.header_timeouts += 1
            limit, answer = guard.limits.header_timeout_s, self._partial
            detail = f"request line and headers not received within {limit:g} s (--header-timeout)"
        else:
            guard.body_timeouts += 1
            limit, answer = guard.limits.body_timeout_s, self.cycle is not None and not self.cycle.response_started
            detail = f"request body: nothing received for {limit:g} s (--body-timeout)"
        logger.warning("connection closed: %s", detail)
        if answer:
            self.transport.write(_raw_response(408, detail))
        self._close()

    def close_waiting(self) -> None:
        """Close this connection, which waits for a request's headers, to make room for a new one."""
        self._close()

    def _close(self) -> None:
        self._stop_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's next receive() says http.disconnect
        self.transport.close()


SERVICE_UNAVAILABLE = _raw_response(
    503, "too many open connections; try again shortly (--max-connections)", (("retry-after", "1"),)
)


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol class of its own for one server (its guard is that server's state)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": ConnectionGuard(limits)})


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft limit of open files to `wanted` (at most the hard limit); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def connection_cap(requested: int | None) -> int:
    """The --max-connections in force: `requested` (or the default) within the file descriptors this process gets.

    Raises the soft limit as needed; ValueError naming the flag when an explicit request cannot be met."""
    wanted = requested if requested is not None else DEFAULT_MAX_CONNECTIONS
    soft = raise_fd_limit(wanted + FD_RESERVE)
    room = soft - FD_RESERVE
    if wanted <= room:
        return wanted
    if requested is not None:
        raise ValueError(
            f"--max-connections {requested}: this process may open {soft} files (ulimit -n, hard limit "
            f"included) and keeps {FD_RESERVE} for itself; expected at most {max(room, 1)}"
        )
    return max(room, 1)

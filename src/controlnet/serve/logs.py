"""The server's log: one stderr handler that lets through a few lines of each kind per minute.

A client can make the server log as fast as it can send: every malformed request is an "Invalid HTTP request
received." warning, every refused connection a line, every file-descriptor exhaustion a traceback from asyncio's
accept loop (~120 MB a minute under a half-open-connection flood). A log that grows that fast fills the disk and
buries the lines that matter. `RateLimitedHandler` keeps, per kind of record (logger, level, message template and
exception type: the same warning for different clients is one kind), the first `burst` records of each `window_s`;
the last one it keeps says that more will be suppressed, and once the window is over one line says how many were.

What bypasses logging and writes to stderr itself (gradio prints the traceback of every event that fails on a
malformed request: 25-40 lines each, as often as a client sends one) goes through `LineLimitedStream`: at most
`DEFAULT_STDERR_LINES` lines a minute, then one line saying how many it left out.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from dataclasses import dataclass

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_BURST = 10
DEFAULT_WINDOW_S = 60.0
DEFAULT_STDERR_LINES = 200


@dataclass
class _Window:
    start: float
    kept: int = 0
    suppressed: int = 0


class RateLimitedHandler(logging.StreamHandler):
    """A StreamHandler that keeps at most `burst` records of each kind per `window_s` (see the module docstring)."""

    def __init__(self, stream=None, burst: int = DEFAULT_BURST, window_s: float = DEFAULT_WINDOW_S, clock=None):
        super().__init__(stream)
        if burst < 1 or not window_s > 0:
            raise ValueError(f"burst {burst}, window_s {window_s}: expected burst >= 1 and window_s > 0")
        self.burst, self.window_s = burst, window_s
        self.clock = clock or time.monotonic
        self.windows: dict[tuple, _Window] = {}

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle holds self.lock around emit: the windows need no lock of their own
        now = self.clock()
        for summary in self._closed_windows(now):
            super().emit(summary)
        key = _kind(record)
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = _Window(now)
        if window.kept >= self.burst:
            window.suppressed += 1
            return
        window.kept += 1
        if window.kept == self.burst:
            record = _with_note(
                record, f"[{self.burst} lines like this in {self.window_s:g} s: more are suppressed until then]"
            )
        super().emit(record)

    def close(self) -> None:
        with self.lock:
            for summary in self._closed_windows(float("inf")):
                super().emit(summary)
        super().close()

    def _closed_windows(self, now: float) -> list[logging.LogRecord]:
        """Forget the windows that are over; one summary record for each that suppressed something."""
        summaries = []
        for key, window in list(self.windows.items()):
            if now - window.start < self.window_s:
                continue
            del self.windows[key]
            if window.suppressed:
                name, level, message = key[0], key[1], key[2]
                summaries.append(
                    logging.LogRecord(
                        name,
                        level,
                        __file__,
                        0,
                        "suppressed %d more lines like %r in %g s",
                        (window.suppressed, message, self.window_s),
                        None,
                    )
                )
        return summaries


def _kind(record: logging.LogRecord) -> tuple:
    exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
    return record.name, record.levelno, str(record.msg)[:200], exc_type


def _with_note(record: logging.LogRecord, note: str) -> logging.LogRecord:
    """A copy of `record` whose message ends with `note` (the arguments merged in first)."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args = f"{record.getMessage()} {note}", None
    return copy


class LineLimitedStream:
    """A text stream that writes at most `max_lines` lines per `window_s` to `stream`, then drops lines until the
    window is over and says how many it dropped (at the next write, or at close). Other attributes pass through."""

    def __init__(
        self, stream, max_lines: int = DEFAULT_STDERR_LINES, window_s: float = DEFAULT_WINDOW_S, clock=None
    ):
        self.stream, self.max_lines, self.window_s = stream, max_lines, window_s
        self.clock = clock or time.monotonic
        self.start, self.lines, self.dropped = self.clock(), 0, 0
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            now = self.clock()
            if now - self.start >= self.window_s:
                self._report()
                self.start, self.lines = now, 0
            if self.lines >= self.max_lines:
                self.dropped += text.count("\n")
                return len(text)
            self.lines += text.count("\n")
            self.stream.write(text)
            if self.lines >= self.max_lines:
                self.stream.write(
                    f"[{self.max_lines} lines on stderr in {self.window_s:g} s: more are suppressed]\n"
                )
            return len(text)

    def _report(self) -> None:
        if self.dropped:
            self.stream.write(f"[suppressed {self.dropped} lines on stderr in {self.window_s:g} s]\n")
            self.stream.flush()
            self.dropped = 0

    def close(self) -> None:
        with self.lock:
            self._report()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def install(burst: int = DEFAULT_BURST, window_s: float = DEFAULT_WINDOW_S, stream=None) -> RateLimitedHandler:
    """Make a RateLimitedHandler on stderr the root logger's only handler (every logger propagates to it), and send
    what else writes to sys.stderr through a LineLimitedStream."""
    stream = stream or sys.stderr
    if not isinstance(sys.stderr, LineLimitedStream):
        sys.stderr = LineLimitedStream(stream, window_s=window_s)
        atexit.register(sys.stderr.close)
    handler = RateLimitedHandler(stream, burst=burst, window_s=window_s)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return handler

"""Connections against the REAL server on loopback: half-sent requests are closed after --header-timeout or
--body-timeout, --max-connections holds at connection time (stalled connections make room, requests under way are
never cut), health answers within a second under 5,000 half-open connections, the log stays short, and the
mounted page has no dev-reload stream and logs one line (not ~200) for an unknown session."""

from __future__ import annotations

import io
import logging
import resource
import socket
import time

import httpx
import pytest

from controlnet import cli
from controlnet.serve import commands, connections, logs
from controlnet.serve.logs import RateLimitedHandler
from controlnet.testing.live_server import start_server

FLOOD_HEADER_TIMEOUT_S = 5.0  # long enough to hold HALF_OPEN connections at once while the server accepts them
HEADER_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 3.0
CAP = 20
HALF_OPEN = 5000  # the load: ~21,000 of them used up the server's file descriptors
HEALTH_LIMIT_S = 1.0
PARTIAL_REQUEST = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # and then nothing
RSS_GROWTH_LIMIT_MB = 250.0  # for HALF_OPEN connections (measured: about 90 MB)


def _address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes: then TimeoutError)."""
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length from a kept-alive connection."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(
        next(
            v
            for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
            if k.lower() == b"content-length"
        )
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _health_seconds(server) -> float:
    start = time.monotonic()
    response = httpx.get(server.url + "/v1/health", timeout=10)  # a new connection each time
    assert response.status_code == 200, response.text
    return time.monotonic() - start


def _log_lines(server) -> list[str]:
    return server.log.read_text(errors="replace").splitlines()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(None, log, "--header-timeout", str(FLOOD_HEADER_TIMEOUT_S))  # with the page if installed
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    timeouts = ("--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S))
    srv = start_server(None, log, "--no-ui", "--max-connections", str(CAP), *timeouts)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def test_half_open_connections_are_closed_and_health_answers_meanwhile(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HALF_OPEN + 512:
        if hard != resource.RLIM_INFINITY and hard < HALF_OPEN + 512:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (HALF_OPEN + 512, hard))
    fds_before, rss_before = server.open_fds(), server.rss_mb()
    log_before = len(_log_lines(server))
    socks = []
    try:
        opened = time.monotonic()
        for _ in range(HALF_OPEN):
            sock = socket.create_connection(_address(server), timeout=10)
            sock.sendall(PARTIAL_REQUEST)
            socks.append(sock)
        open_s = time.monotonic() - opened
        # health is asked once the server holds them all (while it is still accepting a burst of thousands, a
        # new connection waits its turn in the kernel's accept queue: benchmarks/serve_load.py measures that)
        while (held := server.open_fds() - fds_before) < HALF_OPEN * 0.95 and time.monotonic() - opened < 10:
            time.sleep(0.05)
        latencies = [_health_seconds(server) for _ in range(5)]
        rss_growth = server.rss_mb() - rss_before
        # each is answered 408 and closed once --header-timeout has passed since it connected
        deadline = opened + open_s + FLOOD_HEADER_TIMEOUT_S + 15
        for sock in socks:
            answer = _recv_all(sock, max(0.1, deadline - time.monotonic()))
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        closed_after_s = time.monotonic() - opened
    finally:
        for sock in socks:
            sock.close()
    assert held >= HALF_OPEN * 0.95, f"the server held {held} of {HALF_OPEN} connections at once"
    assert max(latencies) < HEALTH_LIMIT_S, latencies
    assert rss_growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {rss_growth:.0f} MB for {HALF_OPEN} connections"
    assert closed_after_s < open_s + FLOOD_HEADER_TIMEOUT_S + 15
    time.sleep(0.5)
    assert server.open_fds() <= fds_before + 10, "the server's sockets were not released"
    assert _health_seconds(server) < HEALTH_LIMIT_S
    # 5,000 timeouts are logged as a few lines, not 5,000
    new_lines = _log_lines(server)[log_before:]
    assert 1 <= sum("connection closed" in line for line in new_lines) <= 10, new_lines[:20]
    assert len(new_lines) <= 20, new_lines[:40]


def test_connection_that_sends_nothing_is_closed_without_an_answer(capped):
    with socket.create_connection(_address(capped)) as sock:
        start = time.monotonic()
        assert _recv_all(sock, HEADER_TIMEOUT_S + 10) == b""
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - start < HEADER_TIMEOUT_S + 5


def test_stalled_body_is_408_after_the_body_timeout(capped):
    with socket.create_connection(_address(capped)) as sock:
        head = b"POST /v1/annotate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: 1000\r\n\r\n{")
        start = time.monotonic()
        time.sleep(BODY_TIMEOUT_S / 2)
        sock.sendall(b'"image"')  # progress restarts the timer: the pause, not the whole body, is bounded
        answer = _recv_all(sock, BODY_TIMEOUT_S * 3 + 10)
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"--body-timeout" in answer
    assert BODY_TIMEOUT_S * 1.5 - 0.5 < took < BODY_TIMEOUT_S * 1.5 + 5


def test_keep_alive_connection_gets_a_new_header_deadline_after_each_response(capped):
    with socket.create_connection(_address(capped)) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /v1/health HTTP/1.1\r\n")  # the second request stalls after its request line
        start = time.monotonic()
        answer = _recv_all(sock, HEADER_TIMEOUT_S + 10)
    # uvicorn's own keep-alive timer stops at the first byte of a new request: ours still closes it
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert time.monotonic() - start < HEADER_TIMEOUT_S + 5


def test_malformed_requests_are_400_and_logged_a_few_times(server):
    log_before = len(_log_lines(server))
    for _ in range(40):
        with socket.create_connection(_address(server)) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert _recv_all(sock, 10).startswith(b"HTTP/1.1 400 ")
    time.sleep(0.3)
    new_lines = _log_lines(server)[log_before:]
    assert 1 <= sum("Invalid HTTP request" in line for line in new_lines) <= 10, new_lines
    assert "suppressed" in "\n".join(new_lines)


def test_at_the_cap_new_connections_are_refused_at_once_and_requests_under_way_go_on(capped):
    address = _address(capped)
    # a request under way: headers sent, body half sent (never evicted; its --body-timeout is 30 s)
    busy = socket.create_connection(address, timeout=10)
    head = b"POST /v1/annotate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    body = b'{"image": "x", "annotator": "canny"}'
    busy.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    stalled = []
    try:
        for _ in range(19):
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(PARTIAL_REQUEST)
            stalled.append(sock)
        time.sleep(0.2)
        # all 20 are younger than EVICT_MIN_AGE_S: a new connection is answered 503 before it sends anything
        with socket.create_connection(address, timeout=10) as extra:
            start = time.monotonic()
            answer = _recv_all(extra, 5)
            assert time.monotonic() - start < 0.5
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower(), answer[:300]
        # once the stalled ones have waited EVICT_MIN_AGE_S, a new client takes the oldest one's place
        time.sleep(connections.EVICT_MIN_AGE_S + 0.2)
        assert _health_seconds(capped) < HEALTH_LIMIT_S
        evicted = stalled.pop(0)
        assert _recv_all(evicted, 5) == b""
        evicted.close()
        # the request under way was not touched: its body completes and it is answered
        busy.sendall(body[5:])
        busy.settimeout(10)
        status_line = busy.recv(65536).split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 ") and not status_line.startswith(b"HTTP/1.1 5"), status_line
    finally:
        busy.close()
        for sock in stalled:
            sock.close()
    assert f"--max-connections {CAP}" in capped.log.read_text()


def _serve_error(capsys, *args: str) -> str:
    """`controlnet serve ARGS` in this process, which must refuse them before serving: its one stderr line."""
    assert cli.main(["serve", "--no-ui", *args]) == cli.EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_max_connections_beyond_the_open_files_limit_is_one_error_line(capsys):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files")
    assert "--max-connections" in _serve_error(capsys, "--max-connections", str(hard + 1))
    assert "--max-connections 0: expected an integer >= 1" in _serve_error(capsys, "--max-connections", "0")


@pytest.mark.parametrize("flag", ["--header-timeout", "--body-timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan"])
def test_timeouts_must_be_positive_and_finite(capsys, flag, value):
    assert f"{flag} " in _serve_error(capsys, flag, value)


def test_help_shows_the_defaults_the_server_uses():
    assert commands.DEFAULT_MAX_CONNECTIONS == connections.DEFAULT_MAX_CONNECTIONS
    assert commands.DEFAULT_HEADER_TIMEOUT_S == connections.DEFAULT_HEADER_TIMEOUT_S
    assert commands.DEFAULT_BODY_TIMEOUT_S == connections.DEFAULT_BODY_TIMEOUT_S
    assert commands.FD_RESERVE == connections.FD_RESERVE
    limits = connections.ConnectionLimits()
    assert (limits.max_connections, limits.header_timeout_s, limits.body_timeout_s) == (8192, 10.0, 30.0)


def test_rate_limited_handler_keeps_a_burst_per_kind_then_says_how_many_it_left_out():
    class Stream:
        def __init__(self):
            self.lines = []

        def write(self, text):
            self.lines += [line for line in text.splitlines() if line]

        def flush(self):
            pass

    now = [0.0]
    stream = Stream()
    handler = RateLimitedHandler(stream, burst=3, window_s=60, clock=lambda: now[0])
    log = logging.getLogger("test.ratelimit")
    log.propagate, log.handlers = False, [handler]
    try:
        for i in range(100):
            log.warning("client %d sent junk", i)  # one kind: same template
        log.warning("another kind")
        assert len(stream.lines) == 4, stream.lines
        assert stream.lines[2].startswith("client 2 sent junk [3 lines like this")
        now[0] = 61.0
        log.warning("client %d sent junk", 100)
        assert stream.lines[4:] == [
            "suppressed 97 more lines like 'client %d sent junk' in 60 s",
            "client 100 sent junk",
        ]
        for i in range(5):
            log.warning("client %d sent junk", i)
        handler.close()  # at exit: what was suppressed is still counted
        assert stream.lines[-1] == "suppressed 3 more lines like 'client %d sent junk' in 60 s"
    finally:
        log.handlers = []


def test_page_has_no_dev_reload_stream_and_client_errors_are_not_tracebacks(server):
    pytest.importorskip("gradio")
    if httpx.get(server.url + "/ui/config", timeout=30).status_code != 200:
        pytest.skip("the server runs without the page")
    start = time.monotonic()
    assert httpx.get(server.url + "/ui/gradio_api/dev/reload", timeout=10).status_code == 404
    assert time.monotonic() - start < HEALTH_LIMIT_S
    log_before = len(_log_lines(server))
    for _ in range(3):  # an unknown session: gradio streams "session not found", then raised (~200 log lines)
        with httpx.stream("GET", server.url + "/ui/gradio_api/queue/data?session_hash=nosuch", timeout=30) as r:
            text = "".join(r.iter_text())
        assert '"session_not_found":true' in text.replace(" ", "")
    join = server.url + "/ui/gradio_api/queue/join"
    for fn_index, data, field in ((9999, [1], "fn_index"), (-1, [1], "fn_index"), (0, [], "data")):
        # an unknown event was a 500 and two ~190-line tracebacks; a wrong count a printed traceback
        response = httpx.post(join, json={"data": data, "fn_index": fn_index, "session_hash": "s"}, timeout=30)
        assert response.status_code == 422 and response.json()["field"] == field, response.text
    time.sleep(0.5)
    # (earlier tests' suppressed-lines summaries may come out now: the page's own lines are counted)
    new_lines = [line for line in _log_lines(server)[log_before:] if "suppressed" not in line]
    assert len(new_lines) <= 3 and not any("Traceback" in line for line in new_lines), new_lines[:40]
    assert _health_seconds(server) < HEALTH_LIMIT_S


def test_tracebacks_gradio_prints_for_malformed_page_requests_are_bounded(server):
    pytest.importorskip("gradio")
    config = httpx.get(server.url + "/ui/config", timeout=30)
    if config.status_code != 200:
        pytest.skip("the server runs without the page")
    event = next(d for d in config.json()["dependencies"] if len(d.get("inputs", [])) > 50)  # the generate button
    log_before = len(_log_lines(server))
    join = server.url + "/ui/gradio_api/queue/join"
    for k in range(12):  # the right number of values, all null: gradio prints a ~40-line traceback for each
        body = {"data": [None] * len(event["inputs"]), "fn_index": event["id"], "session_hash": f"junk{k}"}
        assert httpx.post(join, json=body, timeout=30).status_code == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "more are suppressed" not in "\n".join(_log_lines(server)[log_before:]):
        time.sleep(0.2)
    new_lines = _log_lines(server)[log_before:]
    assert "more are suppressed" in "\n".join(new_lines), new_lines[-5:]
    assert len(new_lines) <= logs.DEFAULT_STDERR_LINES + 20, len(new_lines)
    assert _health_seconds(server) < HEALTH_LIMIT_S


def test_line_limited_stream_keeps_a_budget_of_lines_then_says_how_many_it_dropped():
    now = [0.0]
    out = io.StringIO()
    stream = logs.LineLimitedStream(out, max_lines=5, window_s=60, clock=lambda: now[0])
    for i in range(20):
        stream.write(f"line {i}\n")
    assert out.getvalue().splitlines()[:5] == [f"line {i}" for i in range(5)]
    assert out.getvalue().splitlines()[5:] == ["[5 lines on stderr in 60 s: more are suppressed]"]
    now[0] = 61.0
    stream.write("later\n")
    assert out.getvalue().splitlines()[6:] == ["[suppressed 15 lines on stderr in 60 s]", "later"]

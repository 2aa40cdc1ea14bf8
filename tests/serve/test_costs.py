"""What a request costs the REAL server, bounded before the work (issue 27): threads held by waiting clients, pixels,
annotator resolutions, client disconnects. Each test names the defect it guards and asserts a time or memory bound."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import httpx
import pytest

from controlnet.testing.live_server import start_server

LONG_STEPS = 150  # a job long enough (~5-10 s on 2 cores) to be caught running
STREAMS_PER_JOB = 8  # serve/native.py MAX_STREAMS_PER_JOB


@pytest.fixture(scope="module")
def server(models_folder, tmp_path_factory):
    srv = start_server(models_folder, tmp_path_factory.mktemp("log") / "server.log", "--max-queue", "16")
    yield srv
    assert srv.stop(timeout=60) == 0, srv.log.read_text()


@pytest.fixture
def url(server):
    yield server.url
    # every test leaves the queue empty: cancel what is left
    for job_id in _live_jobs(server.url):
        httpx.delete(f"{server.url}/v1/jobs/{job_id}")
    assert httpx.get(server.url + "/v1/health", timeout=5).status_code == 200


_submitted: list[str] = []


def _live_jobs(url: str) -> list[str]:
    live = []
    for job_id in _submitted:
        r = httpx.get(f"{url}/v1/jobs/{job_id}")
        if r.status_code == 200 and r.json()["state"] in ("queued", "running"):
            live.append(job_id)
    return live


def submit(url: str, **fields) -> str:
    r = httpx.post(url + "/v1/jobs", json={"prompt": "x", "steps": LONG_STEPS, **fields})
    assert r.status_code == 202, r.text
    _submitted.append(r.json()["id"])
    return r.json()["id"]


def wait_running(url: str, timeout: float = 60.0) -> str:
    """The running job's id, once it is sampling (past loading its models)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = httpx.get(url + "/v1/health").json()["running"]
        if running and httpx.get(f"{url}/v1/jobs/{running}").json()["step"] > 0:
            return running
        time.sleep(0.05)
    raise AssertionError("no job started sampling")


def open_stream(url: str, job_id: str) -> socket.socket:
    """An event-stream client that reads its response headers and then just waits (as a browser tab does)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the event stream before its headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock


def test_waiting_streams_hold_no_thread(url):
    """Defect: 60 event-stream clients on queued jobs froze every other route for 27-30 s (each held one of the
    framework's 40 threads). Now 64 streams wait and the synchronous routes still answer within a second."""
    jobs = [submit(url) for _ in range(8)]
    socks = [open_stream(url, job_id) for job_id in jobs for _ in range(STREAMS_PER_JOB)]
    try:
        for path in (
            "/v1/health",
            "/v1/models",
            "/sdapi/v1/sd-models",
            "/controlnet/model_list",
            "/v1/annotators",
        ):
            started = time.monotonic()
            r = httpx.get(url + path, timeout=10)
            assert r.status_code == 200, (path, r.text)
            assert time.monotonic() - started < 1.0, f"{path} took {time.monotonic() - started:.1f} s"
        # one more stream on a job that has its fill is refused, the others are unaffected
        r = httpx.get(f"{url}/v1/jobs/{jobs[0]}/events", timeout=10)
        assert r.status_code == 429 and "event streams" in r.json()["detail"]
    finally:
        for sock in socks:
            sock.close()
    # the closed streams are forgotten: a new one on the same job is served again
    time.sleep(0.5)
    with httpx.stream("GET", f"{url}/v1/jobs/{jobs[0]}/events", timeout=10) as r:
        assert r.status_code == 200


def test_webui_job_cancelled_when_its_client_goes(url):
    """Defect: web-UI jobs kept running after their client disconnected (native jobs were cancelled)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    body = json.dumps({"prompt": "x", "steps": LONG_STEPS, "width": 64, "height": 64})
    conn.request("POST", "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
    job_id = wait_running(url)
    _submitted.append(job_id)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    started = time.monotonic()
    while time.monotonic() - started < 10:
        state = httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"]
        if state != "running":
            break
        time.sleep(0.1)
    assert state == "cancelled", state
    assert time.monotonic() - started < 3  # within a sampler step or two, plus the disconnect poll


def test_many_streams_then_health_under_a_second_while_generating(url):
    """Streams, a running generation and the web-UI progress route together: health stays under a second."""
    job_id = submit(url)
    wait_running(url)
    done = threading.Event()
    latencies = []

    def probe():
        while not done.is_set():
            started = time.monotonic()
            assert httpx.get(url + "/sdapi/v1/progress", timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    socks = [open_stream(url, job_id) for _ in range(STREAMS_PER_JOB)]
    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(2)
    done.set()
    thread.join()
    for sock in socks:
        sock.close()
    assert latencies and max(latencies) < 1.0, max(latencies)

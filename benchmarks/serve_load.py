"""Load on `controlnet serve`: event streams, generate clients and half-open connections at once; health must keep
answering within a second.

    python benchmarks/serve_load.py [--streams 60] [--generate 20] [--half-open 5000] [--half-open-rate 1000]
                                    [--min-duration 30] [--no-ui] [-- SERVER FLAGS...]

Starts the real server (built-in models, loopback, --max-queue 128 so that every job is admitted), then at once:
- STREAMS clients each submit a job (POST /v1/jobs: 64x64, 2 steps) and follow it (GET /v1/jobs/{id}/events)
  until its done/failed/cancelled event, while it waits in the queue and while it runs;
- GENERATE clients call POST /v1/generate (64x64, 2 steps) one after another until the run ends;
- HALF_OPEN sockets each send part of a request's headers and stall; one the server closes is opened again (as
  a slowloris client does), so that HALF_OPEN are held throughout. They are opened at --half-open-rate a second
  (0: as fast as this process can);
- a prober process asks GET /v1/health on a new connection every 0.2 s.
Unless --cold, one generation runs before the clock starts (the first loads the base). The run ends when every
stream has its final event and --min-duration has passed (at least one header timeout,
so that the server's closing of stalled connections is seen). The prober and the half-open sockets live in
processes of their own, so that this process's threads do not delay what they measure.

Prints health latency (max, p50, p99, failures), what the server did with the half-open sockets (closed: when,
with what answer), the server's peak RSS and open file descriptors, and the generate and stream outcomes. Exit
status 1 if health ever took >= 1 s or did not answer 200.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HEALTH_LIMIT_S = 1.0
LOAD_NICENESS = 10
PROBE_EVERY_S = 0.2
PARTIAL_REQUEST = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\nX-Wait: "
JOB = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2}


def get_health(address: tuple[str, int]) -> int | str:
    """GET /v1/health on a new connection; the status code (a raw socket: an httpx client would spend more time
    building its TLS context than the server spends answering)."""
    t0 = time.monotonic()
    with socket.create_connection(address, timeout=30) as sock:
        connected = time.monotonic() - t0
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if time.monotonic() - t0 >= HEALTH_LIMIT_S:
        print(
            f"slow health: connected after {connected:.3f} s, answered after {time.monotonic() - t0:.3f} s",
            flush=True,
        )
    return int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else "no answer"


def probe_health(address: tuple[str, int], stop, results) -> None:
    """Prober process: health on a new connection every PROBE_EVERY_S until `stop`; (t, seconds, status)."""
    out = []
    start = time.monotonic()
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status = get_health(address)
        except OSError as err:
            status = type(err).__name__
        out.append((t0 - start, time.monotonic() - t0, status))
        time.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - t0)))
    results.put(out)


def hold_half_open(address: tuple[str, int], count: int, rate: float, stop, results) -> None:
    """Half-open process: keep `count` sockets with a partial request open, reopening those the server closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count + 256, hard), hard))
    selector = selectors.DefaultSelector()
    opened_at = {}
    closes = []  # (seconds since the run started, seconds the socket was open, the server's answer)
    failures = collections.Counter()
    start = time.monotonic()
    opened, peak = 0, 0

    def open_one() -> None:
        nonlocal opened
        try:
            sock = socket.create_connection(address, timeout=5)
            sock.sendall(PARTIAL_REQUEST)
        except OSError as err:
            failures[type(err).__name__] += 1
            return
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        opened_at[sock] = time.monotonic()
        opened += 1

    while not stop.is_set():
        # open (or reopen) up to `count`, at `rate` a second
        budget = count - len(opened_at)
        if rate > 0:
            budget = min(budget, max(1, int(rate * 0.05)))
        for _ in range(budget):
            open_one()
        peak = max(peak, len(opened_at))
        for key, _ in selector.select(timeout=0.05):
            sock = key.fileobj
            try:
                data = sock.recv(256)
                answer = data.split(b"\r\n", 1)[0].decode("latin-1")[9:12] if data else "closed, no answer"
            except ConnectionResetError:
                answer = "reset"
            except BlockingIOError:
                continue
            now = time.monotonic()
            closes.append((now - start, now - opened_at.pop(sock), answer))
            selector.unregister(sock)
            sock.close()
    for sock in opened_at:
        sock.close()
    results.put({"opened": opened, "peak": peak, "closes": closes, "failures": dict(failures)})


def follow_job(url: str, outcomes: collections.Counter, lock: threading.Lock) -> None:
    """One event-stream client: submit a job, follow its events to the final one."""
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            submitted = client.post("/v1/jobs", json=JOB)
            if submitted.status_code != 202:
                outcome = f"submit {submitted.status_code}"
            else:
                outcome = "stream ended without a final event"
                job = submitted.json()["id"]
                with client.stream("GET", f"/v1/jobs/{job}/events") as response:
                    if response.status_code != 200:
                        outcome = f"events {response.status_code}"
                    for line in response.iter_lines():
                        if line.startswith("event: ") and line[7:] != "progress":
                            outcome = f"event: {line[7:]}"
    except httpx.HTTPError as err:
        outcome = type(err).__name__
    with lock:
        outcomes[outcome] += 1


def generate_until(url: str, stop: threading.Event, outcomes: collections.Counter, lock: threading.Lock) -> None:
    """One generate client: POST /v1/generate again and again until `stop`."""
    with httpx.Client(base_url=url, timeout=600) as client:
        while not stop.is_set():
            try:
                response = client.post("/v1/generate", json=JOB)
                outcome = str(response.status_code)
                if response.status_code == 429:
                    time.sleep(float(response.headers.get("retry-after", "1")))
            except httpx.HTTPError as err:
                outcome = type(err).__name__
            with lock:
                outcomes[outcome] += 1


def sample_server(server, stop: threading.Event, samples: list) -> None:
    while not stop.is_set():
        try:
            samples.append((server.rss_mb(), server.open_fds()))
        except OSError:
            return
        time.sleep(0.25)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=60, help="event-stream clients (default: %(default)s)")
    parser.add_argument(
        "--generate", type=int, default=20, help="POST /v1/generate clients (default: %(default)s)"
    )
    parser.add_argument(
        "--half-open", type=int, default=5000, help="half-open sockets held (default: %(default)s)"
    )
    parser.add_argument(
        "--half-open-rate",
        type=float,
        default=1000.0,
        help="sockets opened a second, 0: at once (default: %(default)g)",
    )
    parser.add_argument("--min-duration", type=float, default=30.0, help="seconds at least (default: %(default)g)")
    parser.add_argument("--no-ui", action="store_true", help="start the server without the web page")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="start the load on a server that has not generated yet (its first job loads the base meanwhile)",
    )
    parser.add_argument("server_flags", nargs="*", help="more flags for controlnet serve (after --)")
    args = parser.parse_args()

    from controlnet.testing.live_server import start_server

    log = Path(tempfile.mkdtemp()) / "server.log"
    flags = ["--max-queue", "128", *(["--no-ui"] if args.no_ui else []), *args.server_flags]
    server = start_server(None, log, *flags)
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    print(f"server {server.url} (pid {server.pid}, log {log}), flags: {' '.join(flags)}", flush=True)
    if not args.cold:
        # the base is loaded on the first job (about 1-2 s of the worker thread holding the interpreter lock in
        # diffusers' loader): once, before the clock starts, unless --cold
        warm = time.monotonic()
        status = httpx.post(server.url + "/v1/generate", json=JOB, timeout=600).status_code
        print(f"warm-up generate: {status} in {time.monotonic() - warm:.1f} s", flush=True)
    rss_start, fds_start = server.rss_mb(), server.open_fds()

    ctx = mp.get_context("fork")  # the children need nothing of torch: this process never imported it
    stop_children, probes_out, half_open_out = ctx.Event(), ctx.Queue(), ctx.Queue()
    prober = ctx.Process(target=probe_health, args=((host, int(port)), stop_children, probes_out))
    prober.start()
    # the load generators yield the CPU to the server and the prober: on a machine of few cores they would
    # otherwise delay the server by competing with it, which is not what is measured here (threads inherit it)
    os.nice(LOAD_NICENESS)
    holder = ctx.Process(
        target=hold_half_open,
        args=((host, int(port)), args.half_open, args.half_open_rate, stop_children, half_open_out),
    )
    stop_threads, lock = threading.Event(), threading.Lock()
    stream_outcomes, generate_outcomes, samples = collections.Counter(), collections.Counter(), []
    streams = [
        threading.Thread(target=follow_job, args=(server.url, stream_outcomes, lock)) for _ in range(args.streams)
    ]
    generators = [
        threading.Thread(target=generate_until, args=(server.url, stop_threads, generate_outcomes, lock))
        for _ in range(args.generate)
    ]
    sampler = threading.Thread(target=sample_server, args=(server, stop_threads, samples))

    start = time.monotonic()
    for worker in (holder, sampler, *streams, *generators):
        worker.start()
    for thread in streams:
        thread.join()
    streams_s = time.monotonic() - start
    time.sleep(max(0.0, args.min_duration - streams_s))
    stop_children.set()
    probes, half_open = probes_out.get(timeout=120), half_open_out.get(timeout=120)
    prober.join()
    holder.join()
    stop_threads.set()
    for thread in (*generators, sampler):
        thread.join()
    run_s = time.monotonic() - start
    alive = server.alive()
    exit_status = server.stop()

    latencies = [seconds for _, seconds, _ in probes]
    bad = [(round(t, 1), round(s, 3), status) for t, s, status in probes if status != 200 or s >= HEALTH_LIMIT_S]
    closes = half_open["closes"]
    answers = collections.Counter(answer for _, _, answer in closes)
    open_for = [seconds for _, seconds, _ in closes]
    first_close = min((t for t, _, _ in closes), default=float("nan"))
    peak_rss = max((rss for rss, _ in samples), default=float("nan"))
    peak_fds = max((fds for _, fds in samples), default=0)
    report = {
        "run_s": round(run_s, 1),
        "streams_finished_s": round(streams_s, 1),
        "health": {
            "probes": len(latencies),
            "max_s": round(max(latencies), 3),
            "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(percentile(latencies, 0.99), 3),
            "over_limit_or_failed": bad[:20],
        },
        "half_open": {
            "held_at_peak": half_open["peak"],
            "opened": half_open["opened"],
            "closed_by_server": len(closes),
            "first_closed_at_s": round(first_close, 1),
            "open_for_s": {
                "min": round(min(open_for), 1) if open_for else None,
                "p50": round(statistics.median(open_for), 1) if open_for else None,
                "max": round(max(open_for), 1) if open_for else None,
            },
            "server_answers": dict(answers),
            "connect_failures": half_open["failures"],
        },
        "server": {
            "rss_mb": {"start": round(rss_start), "peak": round(peak_rss)},
            "open_fds": {"start": fds_start, "peak": peak_fds},
            "alive_at_end": alive,
            "exit_status": exit_status,
        },
        "streams": dict(stream_outcomes),
        "generate": dict(generate_outcomes),
    }
    print(json.dumps(report, indent=2))
    ok = not bad and alive and exit_status == 0
    print(
        f"health max {max(latencies):.3f} s, p50 {statistics.median(latencies):.3f} s over {len(latencies)} probes; "
        f"{len(closes)} half-open sockets closed by the server; peak RSS {peak_rss:.0f} MB, {peak_fds} fds: "
        + ("OK" if ok else f"FAILED (health limit {HEALTH_LIMIT_S:g} s)")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

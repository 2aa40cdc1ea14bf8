"""`controlnet serve` starting and stopping as a process: the banner means the port is open, and SIGTERM while it is
still starting exits cleanly (issues 27 and 28)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from controlnet.testing.live_server import free_port

BANNER = "controlnet serve: http://"
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def spawn(port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "controlnet.cli", "serve", "--port", str(port), "--threads", "1", "--no-ui"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115


def catches_sigterm(pid: int) -> bool:
    """The process has a handler of its own for SIGTERM (SigCgt in /proc: Python's handler is installed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    return False


def test_the_banner_comes_once_the_port_answers(tmp_path):
    """Defect (issue 28): the banner was printed before the port was bound; a script that waited for it and then
    connected was refused."""
    port, log = free_port(), tmp_path / "serve.log"
    proc = spawn(port, log)
    try:
        deadline = time.monotonic() + 120
        while BANNER not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()


def test_sigterm_while_starting_exits_cleanly(tmp_path):
    """Defect (issue 27): SIGTERM during start-up (while models and libraries load) ended the process by the signal
    with no word; now it exits 0 with one line, promptly."""
    port, log = free_port(), tmp_path / "serve.log"
    proc = spawn(port, log)
    deadline = time.monotonic() + 60
    while not catches_sigterm(proc.pid):  # serve's own start-up handler is in place
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.005)
    assert BANNER not in log.read_text()  # still starting
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    assert time.monotonic() - sent < 10
    text = log.read_text()
    assert "stopped while starting" in text and "Traceback" not in text, text

"""Start the REAL `controlnet serve` in a subprocess on a free loopback port (tests and benchmarks talk HTTP to it).

Needs the [serve] extra (httpx, and the server's FastAPI and uvicorn in the subprocess)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 120.0
TINY_CONTROLNET = "control_tiny_canny"  # its name in the models folder: the registry guesses condition "canny"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models_folder(folder: Path, seed: int = 0, nonzero: bool = True) -> Path:
    """A models folder with one tiny ControlNet copied from the built-in base's UNet (diffusers format).

    `nonzero`: its zero convolutions get small random weights, so that control visibly changes the images (a
    fresh ControlNet adds exactly zero: paper Sec. 3.1)."""
    import torch

    from controlnet import ControlNet, save_controlnet
    from controlnet.generate.base import load_base

    base = load_base("builtin")
    torch.manual_seed(seed)
    net = ControlNet.from_unet(base.unet, hint_downscale_factor=base.vae_scale_factor)
    if nonzero:
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "zero" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
                    p.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_controlnet(net, folder / TINY_CONTROLNET)
    return folder


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        """File descriptors the server holds now (client sockets among them)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def watch_memory(proc: subprocess.Popen, max_rss_mb: float, log: Path, every_s: float = 0.05) -> threading.Thread:
    """A daemon thread that SIGKILLs `proc` when its resident memory passes `max_rss_mb` (and notes it in `log`)."""

    def watch():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                rss = next(int(x.split()[1]) for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
            except (OSError, StopIteration):
                return
            if rss / 1024 > max_rss_mb:
                proc.kill()
                with open(log, "a") as fh:
                    fh.write(
                        f"\nwatchdog: killed the server at {rss / 1024:.0f} MB resident (limit {max_rss_mb:g} MB)\n"
                    )
                return
            time.sleep(every_s)

    thread = threading.Thread(target=watch, name="live-server-memory-watchdog", daemon=True)
    thread.start()
    return thread


def start_server(
    models: Path | None,
    log: Path,
    *args: str,
    auth: tuple[str, str] | None = None,
    env: dict[str, str] | None = None,
    max_rss_mb: float | None = None,
) -> Server:
    """`controlnet serve --port FREE --threads 1 ARGS [--models MODELS]`, its output in `log`, once /v1/health
    answers 200 (with `auth`). `env`: variables to set for it on top of this process's environment.
    `max_rss_mb`: a watchdog kills the server once its resident memory passes this (tests of memory bounds: a
    regression fails the test instead of swapping or killing the machine; the log says so)."""
    port = free_port()
    cmd = [sys.executable, "-m", "controlnet.cli", "serve", "--port", str(port), "--threads", "1", *args]
    if models is not None:
        cmd += ["--models", str(models)]
    fh = open(log, "wb")  # noqa: SIM115 - stays open for the server's life
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/v1/health", auth=auth, timeout=2).status_code == 200:
                if max_rss_mb is not None:
                    watch_memory(proc, max_rss_mb, log)
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not answer /v1/health within {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")

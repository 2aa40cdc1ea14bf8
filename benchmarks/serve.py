"""Overhead of `controlnet serve`: built-in generation through POST /v1/generate vs the pipeline in one process.

    python benchmarks/serve.py [--images 10] [--steps 20]

Starts the real server (subprocess, loopback, one built-in-base ControlNet copied from its UNet), then measures:
- direct: `run_job(pipe, job)` in this process, the same job (same settings, same ControlNet) per image,
  interleaved with the served request of the same seed (median of the pairs' ratios);
- served, 1 client: the same request over HTTP, one at a time (includes JSON, base64, PNG encode + decode);
- served, 4 clients: 4 threads posting at once (jobs run one at a time per device: throughput, not latency).
Both sides use --threads/torch.set_num_threads equal, so only the serving layer differs.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from PIL import Image

    from controlnet.generate.jobs import run_job
    from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
    from controlnet.io.api import load_controlnet
    from controlnet.testing.live_server import TINY_CONTROLNET, make_models_folder, start_server

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    models = make_models_folder(tmp / "models")
    cond = Image.new("RGB", (64, 64))
    buffer = io.BytesIO()
    cond.save(buffer, format="PNG")
    body = {
        "prompt": "a red circle",
        "steps": args.steps,
        "units": [{"model": TINY_CONTROLNET, "image": base64.b64encode(buffer.getvalue()).decode()}],
    }

    from controlnet.generate.base import load_base
    from controlnet.generate.pipeline import ControlNetPipeline

    base = load_base("builtin")
    net = load_controlnet(models / TINY_CONTROLNET, unet=base.unet).eval().requires_grad_(False)
    pipe = ControlNetPipeline.from_components(base, [net])

    def job(seed):
        return GenerationJob(
            prompt=body["prompt"],
            units=[ControlUnit(TINY_CONTROLNET, image=cond)],
            options=GenerationOptions(steps=args.steps, seed=seed),
        )

    def direct(seed) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            run_job(pipe, job(seed))
            return time.perf_counter() - start

    server = start_server(models, tmp / "server.log", "--threads", str(args.threads), "--max-queue", "16")
    try:
        url = server.url + "/v1/generate"
        with httpx.Client(timeout=300) as client:

            def served(seed) -> float:
                start = time.perf_counter()
                client.post(url, json={**body, "seed": seed}).raise_for_status()
                return time.perf_counter() - start

            direct(0), served(0)  # warm-up: loads the models on both sides
            # interleaved, one pair per image: a change in the machine's load falls on both sides alike
            pairs = [(direct(k), served(k)) for k in range(args.images)]
        direct_s = statistics.median(d for d, _ in pairs)
        served_s = statistics.median(s for _, s in pairs)
        ratio = statistics.median(s / d for d, s in pairs)

        codes = []

        def worker(n):
            with httpx.Client(timeout=300) as client:
                for k in range(n):
                    codes.append(client.post(url, json={**body, "seed": k}).status_code)

        per = max(1, args.images // 4)
        threads = [threading.Thread(target=worker, args=(per,)) for _ in range(4)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        four = len(codes) / (time.perf_counter() - start)
        rss = server.peak_rss_mb()
    finally:
        server.stop()
    print(
        f"built-in base, 64 px, {args.steps} steps, 1 ControlNet, {args.threads} thread(s), {args.images} images"
    )
    print(f"direct run_job:        {direct_s * 1000:8.1f} ms/image (median)  ({1 / direct_s:.2f} images/s)")
    print(f"/v1/generate, 1 client:{served_s * 1000:8.1f} ms/image (median)  ({1 / served_s:.2f} images/s)")
    print(f"overhead: {100 * (ratio - 1):+.1f}% (median of the per-image served/direct ratios, pairs interleaved)")
    print(f"/v1/generate, 4 clients:            {four:.2f} images/s  (status codes {sorted(set(codes))})")
    print(f"server peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()

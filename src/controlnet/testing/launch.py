"""The `accelerate launch` command of the multi-process tests: N CPU processes (gloo, CUDA hidden by the caller) on
one machine, on a free loopback port, running `controlnet.cli` (the arguments follow)."""

from __future__ import annotations

import sys

from controlnet.testing.live_server import free_port


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """`python -m accelerate.commands.launch ... -m controlnet.cli`: append the command's own arguments."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "controlnet.cli",
    ]

"""What one request may ask for, the same through every door (the native API, the web-UI API, the page).

A generation's cost grows with pixels x steps x images: these caps bound each factor before anything is decoded
or queued, and a request over one is refused (422 naming the field and the limit), never silently reduced.
"""

from __future__ import annotations

MAX_STEPS = 150  # sampler steps
MAX_SIDE = 2048  # output width or height in pixels
MAX_IMAGES = 8  # images per request (the web UI's batch_size x n_iter)
MAX_CONTROL_SCALE = 10.0  # a ControlNet's strength (the web UI's slider stops at 2)
MAX_GUIDANCE = 50.0  # classifier-free guidance scale
MAX_PROMPT_CHARS = 20_000
MAX_BLOCK_SCALES = 64  # per-output scales of one ControlNet (13 for SD1.5, 10 for SDXL)


def describe() -> str:
    """The limits in one line, for `controlnet serve --help`."""
    return (
        f"per request: at most {MAX_STEPS} steps, {MAX_SIDE} px a side, {MAX_IMAGES} images, control strength "
        f"{MAX_CONTROL_SCALE:g}, guidance {MAX_GUIDANCE:g}, prompts of {MAX_PROMPT_CHARS:,} characters"
    )

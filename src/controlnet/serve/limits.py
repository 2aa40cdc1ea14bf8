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
# An annotator's working size: the image's short side scaled to detect_resolution, the long side following; capped
# by area like an output image (a 1x1024 image at 512 would be 512x524288)
MAX_DETECT_PIXELS = MAX_SIDE * MAX_SIDE
# A generation's work: output pixels x steps x images (SDXL's 1024 px, 50 steps, 8 images). Each factor under its
# own cap can still multiply to 12 times this (2048 px, 150 steps, 8 images: hours on a GPU).
MAX_PIXEL_STEPS = 1024 * 1024 * 50 * 8
# Decoded pixels over all the images of one request (init image, mask, every unit's image): the per-image limit is
# --max-pixels; 16 images of 64 Mpx in a 4 MB request went past 9 GB
MAX_REQUEST_PIXELS = 2**26


def describe_budget() -> str:
    return "e.g. 1024x1024 px, 50 steps, 8 images"


def describe() -> str:
    """The limits in one line, for `controlnet serve --help`."""
    return (
        f"per request: at most {MAX_STEPS} steps, {MAX_SIDE} px a side, {MAX_IMAGES} images, control strength "
        f"{MAX_CONTROL_SCALE:g}, guidance {MAX_GUIDANCE:g}, prompts of {MAX_PROMPT_CHARS:,} characters; "
        f"pixels x steps x images at most {MAX_PIXEL_STEPS:,} ({describe_budget()}); {MAX_REQUEST_PIXELS:,} decoded "
        f"pixels over all of a request's images; annotators work at most at {MAX_DETECT_PIXELS:,} pixels"
    )

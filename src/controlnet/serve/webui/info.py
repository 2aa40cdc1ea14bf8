"""The response of txt2img / img2img: `images` (raw base64 PNGs, then one detected map per unit), `parameters`
(the request without image payloads) and `info`, a JSON *string* (as the web UI sends it) with every value the
generation really used: the seed drawn for -1, the sampler, the base's name and hash, the clamped thresholds.

Each PNG carries its infotext in the "parameters" chunk, the web UI's format, so tools that read web-UI PNGs
(PNG Info, image browsers) read ours.
"""

from __future__ import annotations

import json
import time

from controlnet import __version__
from controlnet.generate.outputs import webui_clip_field, webui_clip_layer
from controlnet.io.images import png_base64
from controlnet.serve.webui.generation import WebUIRequest

VERSION = f"controlnet {__version__}"


def infotext(prompt: str, negative: str, params: dict) -> str:
    """The web UI's "parameters" text: prompt, negative prompt, then 'Key: value' pairs on one line."""
    text = prompt
    if negative:
        text += f"\nNegative prompt: {negative}"
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        shown = json.dumps(value) if isinstance(value, str) and ("," in value or ":" in value) else value
        pairs.append(f"{key}: {shown}")
    return text + "\n" + ", ".join(pairs)


def build_response(request: WebUIRequest, results: list, parameters: dict, base_entry, send_images: bool) -> dict:
    """The JSON body for the results of `request.jobs()` (one GenerationResult per iteration)."""
    job, units = request.job, request.units
    first = results[0].settings
    clip_layer = webui_clip_layer(first)
    seeds = [s for r in results for s in r.seeds]
    extra = {f"ControlNet {k}": u.infotext() for k, u in enumerate(units)}
    params = {
        "Steps": first["steps"],
        "Sampler": first["sampler"],
        "CFG scale": first["guidance_scale"],
        "Seed": None,  # per image below
        "Size": f"{first['width']}x{first['height']}",
        "Model hash": base_entry.hash8,
        "Model": base_entry.name,
        "Denoising strength": first.get("strength"),
        "Clip skip": clip_layer if clip_layer > 1 else None,
        **extra,
        "Version": VERSION,
    }
    negative = job.options.negative_prompt or ""
    texts = [infotext(job.prompt, negative, {**params, "Seed": seed}) for seed in seeds]
    images = []
    if send_images:
        generated = (img for r in results for img in r.images)
        images = [png_base64(img, {"parameters": texts[i]}) for i, img in enumerate(generated)]
        for unit, control in zip(units, results[0].control_images, strict=True):
            if unit.save_detected_map:
                images.append(png_base64(control.convert("RGB")))
    count = len(seeds)
    info = {
        "prompt": job.prompt,
        "all_prompts": [job.prompt] * count,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": first["width"],
        "height": first["height"],
        "sampler_name": first["sampler"],  # the sampler that ran, in the web UI's spelling
        "cfg_scale": first["guidance_scale"],
        "steps": first["steps"],
        "batch_size": job.options.batch_size,
        "n_iter": request.n_iter,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": base_entry.name,
        "sd_model_hash": base_entry.hash8,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.get("strength"),
        **webui_clip_field(first),
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
    }
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}

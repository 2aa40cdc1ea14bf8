"""Self-describing generation outputs (docs/style.md#self-describing-outputs): PNGs that carry their settings, JSON
sidecars, grids.

Every PNG holds the web UI's "parameters" text chunk (A1111 format, so existing tools read prompt, sampler, seed
and ControlNet units from it) plus the full settings as JSON under "controlnet". The sidecar `<stem>.json` holds
the same JSON and the file names; it is written last and atomically, so its presence marks the job as done.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from controlnet.atomic import atomic_path

SIDECAR_SUFFIX = ".json"
GRID_SUFFIX = "-grid.png"


def a1111_parameters(settings: dict, seed: int, controlnet_names: list[str] | None = None) -> str:
    """The web UI's "parameters" text: prompt, negative prompt, then 'Key: value' pairs on one line."""
    prompt = settings["prompt"] if isinstance(settings["prompt"], str) else settings["prompt"][0]
    pairs = [
        ("Steps", settings["steps"]),
        ("Sampler", settings["sampler"]),
        ("CFG scale", settings["guidance_scale"]),
        ("Seed", seed),
        ("Size", f"{settings['width']}x{settings['height']}"),
        ("Model", Path(str(settings.get("base", "custom"))).name),
    ]
    if settings.get("strength") is not None:
        pairs.append(("Denoising strength", settings["strength"]))
    if webui_clip_layer(settings) > 1:
        pairs.append(("Clip skip", webui_clip_layer(settings)))
    names = controlnet_names or []
    for k, unit in enumerate(settings.get("controlnets", [])):
        module = unit.get("module") or "none"
        model = names[k] if k < len(names) else f"controlnet{k}"
        unit_text = (
            f"Module: {module}, Model: {model}, Weight: {unit['scale']}, Resize Mode: {settings['resize_label']}, "
            f"Guidance Start: {unit['start']}, Guidance End: {unit['end']}, Control Mode: {unit['mode_label']}"
        )
        pairs.append((f"ControlNet {k}", json.dumps(unit_text)))
    text = prompt
    if settings.get("negative_prompt"):
        text += f"\nNegative prompt: {settings['negative_prompt']}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs)


def webui_clip_layer(settings: dict) -> int:
    """The web UI's "Clip skip" (CLIP_stop_at_last_layers) of our settings: it counts the last layer as 1."""
    return int(settings.get("clip_skip") or 0) + 1


def webui_clip_field(settings: dict) -> dict[str, int]:
    """The same as the web UI's info JSON spells it (its key happens to be our setting's name)."""
    return {"clip_skip": webui_clip_layer(settings)}


def png_info(settings: dict, seed: int, controlnet_names: list[str] | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(settings, seed, controlnet_names))
    info.add_text("controlnet", json.dumps({**settings, "seed": seed}, default=str))
    return info


def make_grid(conditions: list[Image.Image], outputs: list[Image.Image]) -> Image.Image:
    """One row: the condition images, then the outputs, all at the outputs' size."""
    tiles = [c.convert("RGB") for c in conditions] + [o.convert("RGB") for o in outputs]
    w, h = outputs[0].size
    grid = Image.new("RGB", (w * len(tiles), h))
    for k, tile in enumerate(tiles):
        grid.paste(tile.resize((w, h)) if tile.size != (w, h) else tile, (k * w, 0))
    return grid


def save_generation(
    result,
    out_dir: str | os.PathLike,
    stem: str,
    controlnet_names: list[str] | None = None,
    grid: bool = True,
    extra: dict | None = None,
) -> dict:
    """Write `<stem>-<k>.png` per image (or `<stem>.png` for one), `<stem>-grid.png` and `<stem>.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        name = f"{stem}.png" if len(result.images) == 1 else f"{stem}-{k}.png"
        image.save(out / name, pnginfo=png_info(result.settings, seed, controlnet_names))
        files.append(name)
    record = {"images": files, "settings": result.settings, **(extra or {})}
    if grid and result.control_images:
        make_grid(result.control_images, result.images).save(out / f"{stem}{GRID_SUFFIX}")
        record["grid"] = f"{stem}{GRID_SUFFIX}"
    sidecar = out / f"{stem}{SIDECAR_SUFFIX}"
    with atomic_path(sidecar) as tmp:  # atomic: the sidecar's presence means the job is complete
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def is_done(out_dir: str | os.PathLike, stem: str) -> bool:
    return (Path(out_dir) / f"{stem}{SIDECAR_SUFFIX}").is_file()

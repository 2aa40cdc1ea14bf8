"""Reading the settings back out of a generated PNG (the reverse of generate/outputs.py `png_info`).

Our PNGs carry the full settings as JSON in the "controlnet" text chunk; PNGs from the web UI (and from tools
that copy its format) carry only the "parameters" infotext: the prompt, an optional "Negative prompt: ..." part,
and a last line of `Key: value` pairs where a value holding commas is a JSON string ("ControlNet 0": "Module:
canny, Model: ..., Weight: 1.0, ..."). Both come back as one settings dict in `GenerationResult.settings`' own
keys, so the web page can put them back into its form. A unit's "Resize Mode" and "Control Mode" labels are read
by the tables beside their enums (control_images.py RESIZE_DISPLAY_NAMES and the web UI's earlier labels,
guidance.py CONTROL_MODES' display names) into `resize_mode` and `mode`; a label neither knows stays text only.
"""

from __future__ import annotations

import contextlib
import json
import re

from controlnet.generate.control_images import resize_mode
from controlnet.generate.guidance import control_mode
from controlnet.io.images import open_image

# one `Key: value` pair of the last infotext line; a value is a JSON string (may hold commas) or runs to the comma
_PAIR = re.compile(r'\s*([A-Za-z][\w /+\-]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
_FIELDS = {  # infotext key -> (settings key, type)
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Model": ("base", str),
    "Denoising strength": ("strength", float),
}
_UNIT_FIELDS = {  # key inside a "ControlNet k" value -> (unit settings key, type)
    "Module": ("module", str),
    "Model": ("model", str),
    "Weight": ("scale", float),
    "Resize Mode": ("resize_label", str),
    "Guidance Start": ("start", float),
    "Guidance End": ("end", float),
    "Control Mode": ("mode_label", str),
}
_UNIT_LABELS = {  # label key -> (canonical key, reader of the label)
    "resize_label": ("resize_mode", resize_mode),
    "mode_label": ("mode", lambda label: control_mode(label).name),
}


def _pairs(line: str) -> dict[str, str]:
    pairs = {}
    for key, value in _PAIR.findall(line):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value.strip('"')
        pairs[key.strip()] = value.strip()
    return pairs


def _typed(value: str, kind):
    try:
        return kind(value)
    except ValueError:
        return None


def parse_parameters(text: str) -> dict:
    """The web UI's "parameters" infotext -> settings (prompt, negative_prompt, steps, ..., controlnets).

    Keys it does not know are kept under "extra"; a text without a parameters line is all prompt."""
    lines = text.strip("\n").split("\n")
    pairs = _pairs(lines[-1]) if lines else {}
    if len(pairs) >= 2 and "Steps" in pairs:  # the web UI's own test: a last line of several pairs
        lines = lines[:-1]
    else:
        pairs = {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE) :].lstrip()
        (negative if in_negative else prompt).append(line)
    settings: dict = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    units, extra = {}, {}
    for key, value in pairs.items():
        if key in _FIELDS:
            name, kind = _FIELDS[key]
            settings[name] = _typed(value, kind)
        elif key == "Size" and _SIZE.match(value):
            settings["width"], settings["height"] = (int(v) for v in _SIZE.match(value).groups())
        elif key == "Clip skip" and value.isdigit():
            settings["clip_skip"] = max(0, int(value) - 1)  # the web UI counts the last layer as 1
        elif key.startswith("ControlNet ") and key[len("ControlNet ") :].isdigit():
            unit = {}
            for ukey, uvalue in _pairs(value).items():
                if ukey in _UNIT_FIELDS:
                    name, kind = _UNIT_FIELDS[ukey]
                    unit[name] = _typed(uvalue, kind)
            for label_key, (name, read) in _UNIT_LABELS.items():
                if not unit.get(label_key):
                    continue
                with contextlib.suppress(ValueError):  # a label neither table knows: kept as its text only
                    unit[name] = read(unit[label_key])
            units[int(key[len("ControlNet ") :])] = unit
        else:
            extra[key] = value
    settings["controlnets"] = [units[k] for k in sorted(units)]
    if extra:
        settings["extra"] = extra
    return settings


def read_png_settings(data: bytes, what: str = "PNG") -> dict:
    """Settings of a generated image from its encoded bytes: our "controlnet" JSON chunk when present, else
    the "parameters" infotext. ValueError naming `what` when the image carries neither."""
    image = open_image(data, what)
    info = getattr(image, "text", None) or image.info
    if "controlnet" in info:
        try:
            settings = json.loads(info["controlnet"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{what}: its 'controlnet' settings chunk is not JSON ({err})") from None
        if isinstance(settings, dict):
            return settings
    if "parameters" in info:
        return parse_parameters(str(info["parameters"]))
    raise ValueError(
        f"{what}: no generation settings in it (expected a PNG with a 'parameters' or 'controlnet' "
        "text chunk, as generated images carry)"
    )

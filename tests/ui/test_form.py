"""ui/form.py and generate/png_settings.py without a browser: the form's job, its API body, settings back."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from controlnet.generate.outputs import a1111_parameters, png_info
from controlnet.generate.png_settings import parse_parameters, read_png_settings
from controlnet.ui.form import FormError, api_request, build_job, editor_images, form_from_settings, unit_key

NETS = ["builtin:canny", "builtin:seg", "control_v11p_sd15_canny [d14c016b]"]
# the web UI's infotext as its PNGs carry it (format of A1111 + sd-webui-controlnet 1.1)
WEBUI_TEXT = (
    "a cat on a sofa, best quality\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3141592, Size: 512x768, Model hash: 6ce0161689, "
    'Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Clip skip: 2, ControlNet 0: "Module: canny, Model: '
    "control_v11p_sd15_canny [d14c016b], Weight: 0.8, Resize Mode: Crop and Resize, Low Vram: False, Processor Res: "
    "512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, Control "
    'Mode: My prompt is more important", Version: v1.7.0'
)


def form(**values):
    base = {
        "prompt": "p",
        "steps": 5,
        "guidance_scale": 3.0,
        "seed": 7,
        "batch_size": 1,
        "width": 0,
        "height": 0,
        "sampler": "base default",
        "init": None,
        "denoise": 0.75,
    }
    for k in range(3):
        base.update(
            {
                unit_key(k, "enabled"): False,
                unit_key(k, "scale"): 1.0,
                unit_key(k, "start"): 0.0,
                unit_key(k, "end"): 1.0,
                unit_key(k, "mode"): "balanced",
                unit_key(k, "resize"): "just_resize",
                unit_key(k, "annotator"): "none",
                unit_key(k, "model"): "builtin:canny",
            }
        )
    base.update(values)
    return base


def test_parse_webui_infotext():
    s = parse_parameters(WEBUI_TEXT)
    assert s["prompt"] == "a cat on a sofa, best quality" and s["negative_prompt"] == "lowres, bad anatomy"
    assert (s["steps"], s["sampler"], s["guidance_scale"], s["seed"]) == (28, "DPM++ 2M Karras", 6.5, 3141592)
    assert (s["width"], s["height"], s["strength"], s["clip_skip"]) == (512, 768, 0.55, 1)
    unit = s["controlnets"][0]
    assert unit == {
        "module": "canny",
        "model": "control_v11p_sd15_canny [d14c016b]",
        "scale": 0.8,
        "resize_label": "Crop and Resize",
        "start": 0.1,
        "end": 0.9,
        "mode_label": "My prompt is more important",
        "resize_mode": "crop_and_resize",
        "mode": "prompt",
    }
    assert s["extra"]["Model hash"] == "6ce0161689" and s["extra"]["Version"] == "v1.7.0"


def test_infotext_without_parameters_line_is_all_prompt():
    assert parse_parameters("just a prompt, with a comma") == {
        "prompt": "just a prompt, with a comma",
        "negative_prompt": "",
        "controlnets": [],
    }


def test_form_from_webui_settings_matches_names_and_labels():
    values = form_from_settings(parse_parameters(WEBUI_TEXT), NETS)
    assert values["sampler"] == "dpmpp_2m_karras" and values["seed"] == 3141592 and values["denoise"] == 0.55
    assert values[unit_key(0, "model")] == "control_v11p_sd15_canny [d14c016b]"
    assert values[unit_key(0, "mode")] == "prompt" and values[unit_key(0, "resize")] == "crop_and_resize"
    assert values[unit_key(0, "annotator")] == "canny" and values[unit_key(0, "enabled")] is True
    assert values[unit_key(1, "enabled")] is False


def test_our_png_round_trips_through_both_chunks():
    settings = {
        "prompt": "x",
        "negative_prompt": "y",
        "steps": 9,
        "sampler": "Euler a",
        "guidance_scale": 5.0,
        "width": 64,
        "height": 48,
        "base": "builtin",
        "strength": None,
        "clip_skip": 0,
        "resize_label": "Just Resize",
        "controlnets": [
            {
                "scale": 0.5,
                "start": 0.0,
                "end": 0.7,
                "mode": "controlnet",
                "mode_label": "ControlNet is more important",
                "module": "canny",
            }
        ],
    }
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=png_info(settings, 11, ["builtin:canny"]))
    full = read_png_settings(buffer.getvalue())
    assert full["seed"] == 11 and full["controlnets"][0]["end"] == 0.7  # the JSON chunk
    text = parse_parameters(a1111_parameters(settings, 11, ["builtin:canny"]))  # the web UI's text alone
    assert (text["seed"], text["steps"], text["width"], text["height"]) == (11, 9, 64, 48)
    assert text["controlnets"][0]["scale"] == 0.5 and text["controlnets"][0]["model"] == "builtin:canny"
    assert form_from_settings(text, NETS)[unit_key(0, "mode")] == "controlnet"


def test_png_without_settings_is_one_clear_error():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="no generation settings in it"):
        read_png_settings(buffer.getvalue(), "dropped PNG")


def test_build_job_uses_photo_and_annotator_else_map():
    photo, cmap = Image.new("RGB", (32, 24), "red"), Image.new("RGB", (16, 16), "white")
    job = build_job(
        form(
            **{
                unit_key(0, "enabled"): True,
                unit_key(0, "photo"): photo,
                unit_key(0, "map"): cmap,
                unit_key(0, "annotator"): "canny",
                unit_key(0, "options"): {"low_threshold": 5},
                unit_key(1, "enabled"): True,
                unit_key(1, "map"): cmap,
                unit_key(1, "scale"): 0.3,
            }
        ),
        "builtin",
    )
    first, second = job.units
    assert (
        first.annotator == "canny"
        and first.image.size == (32, 24)
        and first.annotator_options == {"low_threshold": 5}
    )
    assert second.annotator is None and second.image.size == (16, 16) and second.scale == 0.3
    assert job.options.scheduler is None and job.options.width is None and job.options.seed == 7
    body = api_request(job)
    assert body["units"][0]["annotator"] == "canny" and body["units"][0]["image"].startswith(
        "data:image/png;base64,"
    )
    assert "annotator" not in body["units"][1] and "init_image" not in body


def test_build_job_refuses_a_unit_without_condition():
    with pytest.raises(FormError, match="unit 1: no condition"):
        build_job(form(**{unit_key(0, "enabled"): True}), "builtin")


def test_painted_layers_become_the_inpainting_mask():
    background = Image.new("RGBA", (20, 10), "blue")
    layer = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (5, 2, 9, 6))
    init, mask = editor_images({"background": background, "layers": [layer], "composite": background})
    assert init.mode == "RGB" and mask.mode == "L"
    m = np.asarray(mask) > 0
    assert m[2:6, 5:9].all() and m.sum() == 16
    assert editor_images({"background": background, "layers": [Image.new("RGBA", (20, 10))]})[1] is None
    job = build_job(form(init={"background": background, "layers": [layer]}, denoise=0.4), "builtin")
    assert job.options.mask is not None and job.options.strength == 0.4


def test_every_control_mode_label_our_pngs_write_reads_back():
    """The labels a1111_parameters writes (guidance.CONTROL_MODES display names) are accepted by control_mode, so
    a PNG's "Control Mode: CFG resolution weighting (paper Sec. 3.4)" goes back into the form."""
    from controlnet.generate.guidance import CONTROL_MODES, control_mode

    for name, mode in CONTROL_MODES.items():
        assert control_mode(mode.display_name).name == name
        unit = {"mode_label": mode.display_name}
        assert form_from_settings({"controlnets": [unit]}, NETS)[unit_key(0, "mode")] == name
    with pytest.raises(ValueError, match="unknown control mode 'loud'"):
        control_mode("loud")


def test_every_other_schema_setting_is_a_form_value_that_reaches_the_job_and_the_api_body():
    """The settings the page does not place by hand are generated from the schema ("More settings"): each is a form
    key, lands in the job's options, travels in the API body and comes back from the settings."""
    import dataclasses

    from controlnet.generate.options import GenerationOptions
    from controlnet.settings_cli import meta
    from controlnet.ui.form import form_keys, more_settings

    names = [f.name for f in more_settings()]
    shown = {f.name for f in dataclasses.fields(GenerationOptions) if meta(f, "ui", True)}
    assert set(names) == shown and set(names) <= set(form_keys())
    values = {"eta": 0.3, "guess_mode_form": "diffusers", "resize_mode": "crop_and_resize"}
    job = build_job(form(**values), "builtin")
    options = job.options
    assert (options.eta, options.guess_mode_form, options.resize_mode) == (0.3, "diffusers", "crop_and_resize")
    body = api_request(job)
    assert {k: body[k] for k in values} == values
    back = form_from_settings(job.options.describe(len(job.units)), NETS)
    assert {k: back[k] for k in values} == values
    with pytest.raises(FormError, match="eta=2.0"):
        build_job(form(eta=2.0), "builtin")

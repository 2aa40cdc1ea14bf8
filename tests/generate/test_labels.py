"""One label table per enum, beside the enum (control_images.py RESIZE_DISPLAY_NAMES, guidance.py CONTROL_MODES'
display names): every spelling the web UI has used reads back to one mode, and every label written reads back."""

from __future__ import annotations

import pytest

from controlnet.generate.control_images import RESIZE_DISPLAY_NAMES, RESIZE_MODES, resize_mode
from controlnet.generate.guidance import CONTROL_MODES, WEBUI_CONTROL_MODES, control_mode
from controlnet.generate.png_settings import parse_parameters

RESIZE_SPELLINGS = [
    (0, "just_resize"), (1, "crop_and_resize"), (2, "resize_and_pad"),  # the web UI's ResizeMode enum / img2img
    ("Just Resize", "just_resize"), ("Crop and Resize", "crop_and_resize"), ("Resize and Fill", "resize_and_pad"),
    ("Inner Fit (Scale to Fit)", "crop_and_resize"), ("Scale to Fit (Inner Fit)", "crop_and_resize"),
    ("Outer Fit (Shrink to Fit)", "resize_and_pad"), ("Envelope (Outer Fit)", "resize_and_pad"),
    ("  resize and fill ", "resize_and_pad"), ("just_resize", "just_resize"), ("pad", "resize_and_pad"),
]  # fmt: skip
MODE_SPELLINGS = [
    (0, "balanced"), (1, "prompt"), (2, "controlnet"),  # the web UI's ControlMode enum (older clients)
    ("Balanced", "balanced"), ("My prompt is more important", "prompt"),
    ("ControlNet is more important", "controlnet"), ("my prompt is more important", "prompt"),
    ("CFG resolution weighting (paper Sec. 3.4)", "cfg_resolution"), ("guess", "controlnet"), ("prompt", "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "name"), RESIZE_SPELLINGS)
def test_every_resize_spelling(value, name):
    assert resize_mode(value) == name


@pytest.mark.parametrize(("value", "name"), MODE_SPELLINGS)
def test_every_control_mode_spelling(value, name):
    assert control_mode(value).name == name


@pytest.mark.parametrize("value", [3, -1, True, None, 1.0, "louder"])
def test_other_values_are_refused_naming_the_choices(value):
    with pytest.raises(ValueError, match=r"unknown resize mode .*'Resize and Fill'"):
        resize_mode(value)
    with pytest.raises(ValueError, match=r"unknown control mode .*'ControlNet is more important'"):
        control_mode(value)


def test_labels_written_read_back_and_ints_follow_the_tables():
    assert list(RESIZE_DISPLAY_NAMES) == list(RESIZE_MODES)
    for k, name in enumerate(RESIZE_MODES):
        assert resize_mode(RESIZE_DISPLAY_NAMES[name]) == name and resize_mode(k) == name
    for k, name in enumerate(WEBUI_CONTROL_MODES):
        assert control_mode(k) is CONTROL_MODES[name]
    for mode in CONTROL_MODES.values():
        assert control_mode(mode.display_name) is mode


def test_png_infotext_labels_become_the_settings_names():
    for resize, label in RESIZE_DISPLAY_NAMES.items():
        for mode in CONTROL_MODES.values():
            text = f'x\nSteps: 2, Seed: 1, ControlNet 0: "Resize Mode: {label}, Control Mode: {mode.display_name}"'
            unit = parse_parameters(text)["controlnets"][0]
            assert (unit["resize_mode"], unit["mode"]) == (resize, mode.name)
            assert (unit["resize_label"], unit["mode_label"]) == (label, mode.display_name)
    unit = parse_parameters('x\nSteps: 2, Seed: 1, ControlNet 0: "Resize Mode: Squash, Control Mode: Loud"')
    assert unit["controlnets"][0] == {"resize_label": "Squash", "mode_label": "Loud"}  # unknown: text only

"""xinsir's ProMax types in generation: repaint (id 7) and tile (id 6).

A union net's repaint condition is the init image with the masked pixels black, 0 (xinsir6/ControlNetPlus
promax/controlnet_union_test_inpainting.py; diffusers' StableDiffusionXLControlNetUnionInpaintPipeline example);
the v1.1 inpaint net's keeps -1. What reaches each net's hint encoder is read with a forward pre-hook. A unit with the
tile annotator and no type gets type tile; repaint without a mask, or with another type, is one ValueError line.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.annotate.tile import Tile
from controlnet.generate.control_images import pil_to_unit_tensor
from controlnet.generate.jobs import run_job
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.pipeline import INPAINT, ControlNetPipeline
from controlnet.model.union_controlnet import UnionControlNet
from controlnet.testing.tiny_models import IMAGE_SIZE, condition_image, randomize

PROMPT = "a red cat"
REPAINT_ID, TILE_ID = 7, 6  # xinsir's ids (model/union_controlnet.py UNION_TYPES)


def _union_net(unet, types: int) -> UnionControlNet:
    torch.manual_seed(types)
    return randomize(UnionControlNet.from_unet(unet, num_control_type=types, num_trans_head=4), seed=types).eval()


@pytest.fixture(scope="module")
def promax(sd_parts) -> UnionControlNet:
    """A tiny union net with ProMax's 8 types on the tiny SD base."""
    return _union_net(sd_parts["unet"], 8)


def _pipe(p, net) -> ControlNetPipeline:
    return ControlNetPipeline(p["unet"], p["vae"], p["text_encoder"], p["tokenizer"], p["scheduler"], [net])


def _mask() -> Image.Image:
    """White (repaint) on the left half."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    mask[:, : IMAGE_SIZE // 2] = 255
    return Image.fromarray(mask)


def _seen_conditions(net, run) -> list[torch.Tensor]:
    """The condition images (B, 3, H, W) that reach `net`'s hint encoder while `run()` runs."""
    seen = []
    handle = net.controlnet_cond_embedding.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    "kind, control_type, masked",
    [("union", "repaint", 0.0), ("union", "inpaint", 0.0), ("union", None, 0.0), ("plain", None, -1.0)],
)
def test_repaint_masks_with_black_on_a_union_net_and_minus_one_on_a_plain_net(
    sd_parts, promax, kind, control_type, masked
):
    net = promax if kind == "union" else sd_parts["nets"][0]
    image = condition_image(5)
    run = dict(image=image, mask=_mask(), steps=2, seed=1, output_type="latent", control_type=control_type)
    results = []
    seen = _seen_conditions(net, lambda: results.append(_pipe(sd_parts, net)(PROMPT, [INPAINT], **run)))
    assert len(seen) == 1 and seen[0].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    left, right = seen[0][..., : IMAGE_SIZE // 2], seen[0][..., IMAGE_SIZE // 2 :]
    assert torch.equal(left, torch.full_like(left, masked))  # masked: the net's convention, on a non-black image
    assert pil_to_unit_tensor(image)[..., : IMAGE_SIZE // 2].mean() > 0.2
    torch.testing.assert_close(right, pil_to_unit_tensor(image)[..., IMAGE_SIZE // 2 :], atol=1e-6, rtol=0)
    unit = results[0].settings["controlnets"][0]
    assert results[0].settings["inpaint_condition"] == [True]
    assert unit.get("union_type") == (REPAINT_ID if kind == "union" else None)


def test_an_inpaint_annotator_unit_of_a_job_is_a_union_repaint(sd_parts, promax):
    """run_job's door: control "inpaint" with the inpaint annotator and no type is type repaint, masked pixels 0."""
    unit = ControlUnit(model="u", image=INPAINT, annotator="inpaint")
    options = GenerationOptions(steps=2, seed=1, image=condition_image(6), mask=_mask(), output_type="latent")
    results = []
    job = GenerationJob(prompt=PROMPT, units=[unit], options=options)
    seen = _seen_conditions(promax, lambda: results.append(run_job(_pipe(sd_parts, promax), job)))
    assert float(seen[0][..., : IMAGE_SIZE // 2].abs().max()) == 0.0
    assert results[0].settings["controlnets"][0]["union_type"] == REPAINT_ID


def test_a_tile_annotator_unit_without_a_type_is_type_tile(sd_parts, promax):
    photo = condition_image(7)
    unit = ControlUnit(model="u", image=photo, annotator="tile")
    job = GenerationJob(
        prompt=PROMPT, units=[unit], options=GenerationOptions(steps=2, seed=1, output_type="latent")
    )
    results = []
    seen = _seen_conditions(promax, lambda: results.append(run_job(_pipe(sd_parts, promax), job)))
    entry = results[0].settings["controlnets"][0]
    assert (entry["control_type"], entry["union_type"], entry["module"]) == ("tile", TILE_ID, "tile")
    # the tile map, not the photo, reached the net
    tiled = torch.from_numpy(Tile()(np.asarray(photo))).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(seen[0], tiled, atol=1e-6, rtol=0)
    assert (seen[0] - pil_to_unit_tensor(photo)).abs().mean() > 0.05


@pytest.mark.parametrize(
    "types, extra, message",
    [
        (
            8,
            dict(control_type="repaint"),
            'control "inpaint" needs `image` and `mask`: its condition is the image',
        ),
        (8, dict(mask=True, control_type="canny"), "control_type[0]='canny' (id 3): control \"inpaint\" on union"),
        (6, dict(mask=True), "control[0]=\"inpaint\" needs the repaint type: union control type 'repaint' (id 7)"),
    ],
)
def test_bad_repaint_units_are_one_value_error_line(sd_parts, types, extra, message):
    net = _union_net(sd_parts["unet"], types)
    if extra.pop("mask", False):
        extra["mask"] = _mask()
    with pytest.raises(ValueError) as err:
        _pipe(sd_parts, net)(PROMPT, [INPAINT], image=condition_image(8), steps=2, output_type="latent", **extra)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text, text


def test_the_server_check_agrees_an_inpaint_unit_on_a_union_net_is_a_repaint(tmp_path):
    """Service.check (before queueing) takes what the pipeline takes: no type is repaint; another type, or a net
    without repaint, is a FieldError naming units[0].control_type."""
    from controlnet.generate.base import load_base
    from controlnet.io.api import save_controlnet
    from controlnet.serve.models import ModelRegistry
    from controlnet.serve.service import FieldError, Service

    base = load_base("builtin")
    for types in (8, 6):
        torch.manual_seed(types)
        net = UnionControlNet.from_unet(
            base.unet, num_control_type=types, num_trans_head=4, hint_downscale_factor=base.vae_scale_factor
        )
        save_controlnet(net, tmp_path / f"union{types}")
    service = Service(ModelRegistry([tmp_path], hash_now=False), max_units=1, device="cpu")
    options = GenerationOptions(image=condition_image(9), mask=_mask())

    def check(model: str, **unit):
        unit = ControlUnit(model=model, image=INPAINT, **unit)
        return service.check(GenerationJob(prompt=PROMPT, base="builtin", units=[unit], options=options))

    try:
        assert check("union8").units[0].control_type is None  # the pipeline takes repaint
        for model, unit, words in [
            ("union8", dict(control_type="canny"), "got 'canny' for an inpaint unit"),
            ("union6", {}, "none given (an inpaint unit: repaint), a type this net does not have"),
        ]:
            with pytest.raises(FieldError, match=re.escape(words)) as info:
                check(model, **unit)
            assert info.value.field == "units[0].control_type"
    finally:
        service.close()

"""Union ControlNets in generation: diffusers' SDXL union pipeline's pixels, one file loaded once for several types,
the type from the CLI / a job's annotator, and one-line refusals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.cli import main
from controlnet.generate.control_calls import fused_units, union_type_of
from controlnet.generate.jobs import run_job
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.io.api import save_controlnet
from controlnet.model.union_controlnet import UnionControlNet
from controlnet.testing.tiny_models import condition_image, randomize

PROMPT = "a blue dog on the red circle"


def _union(unet, seed: int, types: int = 8) -> UnionControlNet:
    torch.manual_seed(seed)
    return randomize(UnionControlNet.from_unet(unet, num_control_type=types, num_trans_head=4), seed=seed).eval()


def _ours(p, nets) -> ControlNetPipeline:
    """Our pipeline on the tiny SDXL parts with these ControlNets (one per unit)."""
    keys = ("text_encoder_2", "tokenizer_2")
    return ControlNetPipeline(
        p["unet"], p["vae"], p["text_encoder"], p["tokenizer"], p["scheduler"], nets, **{k: p[k] for k in keys}
    )


def _theirs(p, net):
    """diffusers' `StableDiffusionXLControlNetUnionPipeline` on the same tiny SDXL parts, with `net`'s weights in its
    own `ControlNetUnionModel`."""
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline

    theirs_net = ControlNetUnionModel(**net.diffusers_config()).eval()
    theirs_net.load_state_dict(net.state_dict(), strict=True)
    text = {k: p[k] for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    ref = StableDiffusionXLControlNetUnionPipeline(
        vae=p["vae"],
        unet=p["unet"],
        controlnet=theirs_net,
        scheduler=p["scheduler"],
        add_watermarker=False,
        **text,
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def test_sdxl_union_matches_diffusers_union_pipeline(sdxl_parts):
    p = sdxl_parts
    net = _union(p["unet"], 21)
    cond = condition_image(40)
    ours = _ours(p, [net])
    a = ours(
        PROMPT,
        [cond],
        steps=2,
        seed=3,
        output_type="np",
        guidance_scale=5.0,
        control_scale=0.8,
        control_type="canny",
    ).array
    b = _theirs(p, net)(
        PROMPT,
        control_image=[cond],
        control_mode=[3],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        guidance_scale=5.0,
        controlnet_conditioning_scale=0.8,
    ).images
    assert a.shape == b.shape == (1, 64, 64, 3)
    diff = float(np.abs(a - b).max())
    assert diff <= 1e-4, f"max abs difference {diff:.2e}"  # the bound of the plain SDXL parity test
    # another type is another image: the type reaches the net
    c = ours(PROMPT, [cond], steps=2, seed=3, output_type="np", guidance_scale=5.0, control_type="depth").array
    assert np.abs(a - c).max() > 1e-3


def test_two_units_on_one_union_net_are_one_fused_call_as_diffusers_union_pipeline(sdxl_parts):
    """canny + depth on ONE union net equal diffusers' union pipeline with one net and two images (xinsir's
    multi-condition call, per-condition scales), and differ from the same two units run one call each."""
    p = sdxl_parts
    net = _union(p["unet"], 22)
    a, b = condition_image(41), condition_image(42)
    run = dict(steps=2, seed=4, output_type="np", guidance_scale=5.0, control_scale=[0.6, 0.9])
    fused = _ours(p, [net, net])(PROMPT, [a, b], control_type=["canny", "depth"], **run)
    assert [u["fused"] for u in fused.settings["controlnets"]] == [True, True]
    expected = _theirs(p, net)(
        PROMPT,
        control_image=[a, b],
        control_mode=[3, 1],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
        guidance_scale=5.0,
        controlnet_conditioning_scale=[0.6, 0.9],
    ).images
    assert fused.array.shape == expected.shape == (1, 64, 64, 3)
    diff = float(np.abs(fused.array - expected).max())
    assert diff <= 1e-4, f"max abs difference {diff:.2e}"  # the bound of the plain SDXL parity test
    # two objects of the same weights are two nets: one call per unit, residuals added (not the fused call)
    apart = _ours(p, [net, copy.deepcopy(net)])(PROMPT, [a, b], control_type=["canny", "depth"], **run)
    assert [u["fused"] for u in apart.settings["controlnets"]] == [False, False]
    assert np.abs(fused.array - apart.array).max() > 1e-3


def test_which_units_fuse(sdxl_parts):
    """Units of one union net object fuse when window, mode agree and no block scales are given; the rest run apart."""
    net = _union(sdxl_parts["unet"], 24)
    other = copy.deepcopy(net)  # the same weights, another object: another net

    def groups(nets, types, **settings):
        per_net = GenerationOptions(control_type=types, **settings).per_net(len(nets))
        return fused_units(
            nets, per_net, [union_type_of(n, t, k) for k, (n, t) in enumerate(zip(nets, types, strict=True))]
        )

    types = ["canny", "depth", "openpose"]
    assert groups([net, net, net], types) == [[0, 1, 2]]
    assert groups([net, other, net], types) == [[0, 2]]
    assert groups([net, net, net], types, control_end=[1.0, 0.5, 1.0]) == [[0, 2]]
    assert groups([net, net, net], types, control_start=[0.2, 0.2, 0.0]) == [[0, 1]]
    assert groups([net, net, net], types, control_mode=["balanced", "controlnet", "controlnet"]) == [[1, 2]]
    assert groups([net, net, net], types, block_scales=[None, [1.0] * net.num_control_outputs, None]) == [[0, 2]]
    assert groups([net, net, net], types, control_scale=[0.0, 1.0, 1.0]) == [[1, 2]]  # strength 0: not run
    assert groups([net, net], types[:2], control_end=[1.0, 0.5]) == []


def test_a_fused_call_refuses_a_type_twice_and_more_conditions_than_types(sdxl_parts):
    p = sdxl_parts
    net = _union(p["unet"], 23, types=2)
    conds = [condition_image(43)] * 3
    with pytest.raises(
        ValueError, match=r"^units 0, 1, 2: 3 conditions in one fused call .* 2 types .*control_type"
    ):
        _ours(p, [net] * 3)(PROMPT, conds, steps=2, control_type=["openpose", "depth", "0"])
    # "canny" and "lineart" are one id: diffusers' type vector cannot mark it twice
    with pytest.raises(ValueError, match=r"^units 0, 1: control_type 'lineart' twice in one fused call"):
        _ours(p, [_union(p["unet"], 23)] * 2)(PROMPT, conds[:2], steps=2, control_type=["canny", "lineart"])


@pytest.fixture(scope="module")
def union_folder(saved, sd_parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("union") / "union-6"
    save_controlnet(_union(sd_parts["unet"], 31, types=6), folder)
    return folder


def test_one_file_for_two_types_is_loaded_once_and_each_unit_has_its_type(saved, union_folder, tmp_path):
    pipe = ControlNetPipeline.from_pretrained(saved / "base", controlnets=[union_folder, union_folder])
    assert pipe.controlnets[0] is pipe.controlnets[1]  # one net in memory for both units
    cond = Image.open(saved / "cond1.png").convert("RGB")
    units = [
        ControlUnit(model="u", image=cond, annotator="canny"),  # the type from the annotator
        ControlUnit(model="u", image=cond, control_type="Soft Edge", scale=0.5),  # the web UI's name
    ]
    job = GenerationJob(prompt="a red cat", units=units, options=GenerationOptions(steps=2, seed=1))
    result = run_job(pipe, job)
    assert [n["control_type"] for n in result.settings["controlnets"]] == ["canny", "Soft Edge"]
    assert [n["fused"] for n in result.settings["controlnets"]] == [True, True]  # one call of the shared net
    # the second unit's type changes the image: each unit's type reaches the shared net
    other = [units[0], ControlUnit(model="u", image=cond, control_type="depth", scale=0.5)]
    moved = run_job(pipe, GenerationJob(prompt="a red cat", units=other, options=job.options)).array
    assert np.abs(result.array - moved).max() > 1e-3


def test_cli_generates_with_a_union_net_and_records_the_type(saved, union_folder, tmp_path):
    args = ["generate", "--base", str(saved / "base"), "--controlnet", str(union_folder), "--cond"]
    args += [
        str(saved / "cond1.png"),
        "--control-type",
        "segment",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
        "a cat",
    ]
    assert main(args) == 0
    with Image.open(next(tmp_path.glob("*-0.png"))) as img:
        meta = json.loads(img.text["controlnet"])
    assert meta["controlnets"][0]["control_type"] == "segment"


def test_cli_refuses_a_type_twice_on_one_union_net_in_one_line(saved, union_folder, tmp_path, capsys):
    """canny and lineart are one id: two units of one union file with it would be one fused call marking it twice."""
    args = ["generate", "--base", str(saved / "base"), "--steps", "2", "--out", str(tmp_path / "out")]
    for kind in ("canny", "lineart"):
        args += ["--controlnet", str(union_folder), "--cond", str(saved / "cond1.png"), "--control-type", kind]
    assert main([*args, "a cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "units 0, 1: control_type 'lineart' twice in one fused call" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "net, extra, message",
    [
        (
            "union",
            [],
            "ControlNet 0 is a union ControlNet; name the condition's type by name or id (openpose/pose 0, depth 1,",
        ),
        (
            "union",
            ["--control-type", "tile"],
            "control_type[0]: union control type 'tile' (id 6): this net has 6 types (openpose/pose 0",
        ),
        ("union", ["--control-type", "edges"], "unknown union control type 'edges'"),
        ("plain", ["--control-type", "canny"], "control_type[0]='canny': ControlNet 0 is not a union ControlNet"),
    ],
)
def test_bad_types_are_one_line(saved, union_folder, tmp_path, capsys, net, extra, message):
    path = union_folder if net == "union" else saved / "cn_diffusers"
    args = [
        "generate",
        "--base",
        str(saved / "base"),
        "--controlnet",
        str(path),
        "--cond",
        str(saved / "cond1.png"),
    ]
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "out"), *extra, "a cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

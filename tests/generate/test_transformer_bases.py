"""Transformer bases (SD3, Flux) through the one base loader and the one job runner (issue 29 items 3 and 4).

Tiny SD3 and Flux bases are written as diffusers folders in the test (testing/tiny_transformer_bases.py: the
transformers of tiny_transformers.py, a one-block VAE, tiny CLIP and T5 encoders, tokenizers built offline), their
ControlNets by `from_transformer`. Generation goes through `run_job`, which hands a transformer base to diffusers'
`StableDiffusion3ControlNetPipeline` / `FluxControlNetPipeline`: with the same seed and components the pixels equal
diffusers' called directly (bound: exact, `np.array_equal`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.errors import CheckpointError
from controlnet.generate import base as base_module
from controlnet.generate.base import check_base, load_base
from controlnet.generate.jobs import run_job
from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet
from controlnet.testing.ldm_files import write_controlnet_file
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS
from controlnet.testing.tiny_transformer_bases import write_flux_base, write_sd3_base

SIZE = 32  # pixels; the tiny VAE has factor 1, so latents are 32x32 too
STEPS = 2
ARCHES = ("sd3", "flux")
WRONG = "a ControlNet works only with a base of the family it was trained on"


def _net(arch: str, transformer, seed: int, zero: bool = False):
    """A ControlNet copied from the base; unless `zero`, its zero layers given random values so that it acts."""
    if arch == "sd3":
        net = SD3ControlNet.from_transformer(transformer, num_layers=2)
    else:
        net = FluxControlNet.from_transformer(transformer, num_layers=2, num_single_layers=1)
    if not zero:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith(("controlnet_", "pos_embed_input")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer_bases")
    files = {"sd3": write_sd3_base(root / "sd3"), "flux": write_flux_base(root / "flux")}
    for arch in ARCHES:
        transformer = load_base(str(files[arch])).transformer
        for name, seed, zero in (("net", 7, False), ("net2", 8, False), ("zero", 0, True)):
            path = root / f"{arch}_{name}"
            _net(arch, transformer, seed, zero).save_pretrained(path)
            files[f"{arch}_{name}"] = path
    for k in range(2):
        rng = np.random.default_rng(k)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"cond{k}.png")
        files[f"cond{k}"] = root / f"cond{k}.png"
    files["unet_net"] = write_controlnet_file(root / "control_sd15.safetensors", TINY_UNET_CONFIGS["sd15"])
    return files


def _job(world, arch: str, nets: list[str], **options) -> GenerationJob:
    units = [
        ControlUnit(model=str(world[f"{arch}_{n}"]), image=Image.open(world[f"cond{k}"]).convert("RGB"), **u)
        for k, (n, u) in enumerate(nets)
    ]
    options = GenerationOptions(steps=STEPS, width=SIZE, height=SIZE, seed=3, **options)
    return GenerationJob(prompt="a red cat on a blue circle", base=str(world[arch]), units=units, options=options)


def _pipe(world, arch: str, nets: list[str]):
    return ControlNetPipeline.from_pretrained(str(world[arch]), controlnets=[world[f"{arch}_{n}"] for n in nets])


# ------------------------------------------------------------------------------------------------------------
# (a) the command line
@pytest.mark.slow  # 15-minute budget: a subprocess each (17-24 s); builtin-dit's CLI test covers the SD3 door in-process
@pytest.mark.parametrize("arch", ARCHES)
def test_generate_cli_writes_png_with_settings(world, tmp_path, arch):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "controlnet.cli", "generate", "a red cat", "--base", str(world[arch])]
    cmd += ["--controlnet", str(world[f"{arch}_net"]), "--cond", str(world["cond0"]), "--control-end", "0.5"]
    cmd += ["--steps", str(STEPS), "--width", str(SIZE), "--height", str(SIZE), "--seed", "5", "--out", str(out)]
    cmd += ["--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    png = Image.open(out / "controlnet-5.png")
    assert png.size == (SIZE, SIZE)
    settings = json.loads(png.text["controlnet"])
    assert settings["arch"] == arch and settings["steps"] == STEPS and settings["seeds"] == [5]
    assert settings["base"] == str(world[arch]) and settings["width"] == SIZE
    assert settings["controlnets"][0]["end"] == 0.5 and settings["controlnets"][0]["model"] == str(
        world[f"{arch}_net"]
    )
    assert "Steps: 2" in png.text["parameters"]
    sidecar = json.loads((out / "controlnet-5.json").read_text())
    assert sidecar["settings"]["seeds"] == [5]


# ------------------------------------------------------------------------------------------------------------
# (b) run_job equals diffusers' pipeline called directly
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("multi", [False, True], ids=["one-net", "two-nets"])
def test_run_job_equals_diffusers_pipeline(world, arch, multi):
    from diffusers import (
        FluxControlNetPipeline,
        FluxMultiControlNetModel,
        SD3MultiControlNetModel,
        StableDiffusion3ControlNetPipeline,
    )

    names = ["net", "net2"] if multi else ["net"]
    units = [("net", {"scale": 0.7, "end": 0.5}), ("net2", {"scale": 1.3, "start": 0.5})][: len(names)]
    guidance = {"guidance_scale": 4.0, "negative_prompt": "a dog"} if arch == "sd3" else {}
    job = _job(world, arch, units, batch_size=2, **guidance)
    pipe = _pipe(world, arch, names)
    ours = run_job(pipe, job)

    b, nets = pipe.base, pipe.controlnets
    scheduler = type(b.scheduler).from_config(b.scheduler.config)
    if arch == "sd3":
        net = SD3MultiControlNetModel(nets) if multi else nets[0]
        reference = StableDiffusion3ControlNetPipeline(
            b.transformer, scheduler, b.vae, b.text_encoder, b.tokenizer, b.text_encoder_2, b.tokenizer_2,
            b.text_encoder_3, b.tokenizer_3, net,
        )  # fmt: skip
    else:
        net = FluxMultiControlNetModel(nets) if multi else nets[0]
        reference = FluxControlNetPipeline(
            scheduler, b.vae, b.text_encoder, b.tokenizer, b.text_encoder_2, b.tokenizer_2, b.transformer, net
        )
    images = [u.image for u in job.units]
    kwargs = dict(
        control_image=images if multi else images[0],
        controlnet_conditioning_scale=[0.7, 1.3] if multi else 0.7,
        control_guidance_start=[0.0, 0.5] if multi else 0.0,
        control_guidance_end=[0.5, 1.0] if multi else 0.5,
    )
    torch.manual_seed(3)  # SD3's pipeline samples the condition latents from the global generator
    expected = reference(
        prompt="a red cat on a blue circle",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)],
        output_type="np",
        **({"guidance_scale": 4.0, "negative_prompt": "a dog"} if arch == "sd3" else {"guidance_scale": 0.0}),
        **kwargs,
    ).images
    assert ours.seeds == [3, 4] and ours.array.shape == (2, SIZE, SIZE, 3)
    assert np.array_equal(ours.array, expected)  # the bound: exact
    assert [im.size for im in ours.images] == [(SIZE, SIZE)] * 2
    # the nets act (the comparison would also hold for a pipeline that ignored them)
    without = run_job(pipe, _job(world, arch, [(n, {"scale": 0.0}) for n, _ in units], batch_size=2, **guidance))
    assert np.abs(without.array - ours.array).max() > 1e-3


# ------------------------------------------------------------------------------------------------------------
# (c) a zero-initialised ControlNet gives exactly the base's image (paper Eq. 3)
@pytest.mark.parametrize("arch", ARCHES)
def test_zero_controlnet_gives_the_base_image(world, arch):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    guidance = {"guidance_scale": 4.0} if arch == "sd3" else {}
    pipe = _pipe(world, arch, ["zero"])
    ours = run_job(pipe, _job(world, arch, [("zero", {})], **guidance))
    b = pipe.base
    generator = torch.Generator().manual_seed(3)
    if arch == "sd3":
        base = StableDiffusion3Pipeline(
            b.transformer, b.scheduler, b.vae, b.text_encoder, b.tokenizer, b.text_encoder_2, b.tokenizer_2,
            b.text_encoder_3, b.tokenizer_3,
        )  # fmt: skip
    else:
        base = FluxPipeline(
            b.scheduler, b.vae, b.text_encoder, b.tokenizer, b.text_encoder_2, b.tokenizer_2, b.transformer
        )
        # diffusers' Flux ControlNet pipeline draws the condition's VAE posterior sample (1, 4, 32, 32) from the
        # image's generator before its noise: the base pipeline's generator is advanced by the same draw
        torch.randn((1, b.vae.config.latent_channels, SIZE, SIZE), generator=generator)
    expected = base(
        prompt="a red cat on a blue circle",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=[generator],
        output_type="np",
        **(guidance or {"guidance_scale": 0.0}),
    ).images
    assert np.array_equal(ours.array, expected)  # exact: every residual is 0 * x


# ------------------------------------------------------------------------------------------------------------
# (d) refusals, one line each, before any weights are read
@pytest.mark.parametrize(
    "base, net, control_family",
    [("sd3", "unet_net", "SD1"), ("sd3", "flux_net", "Flux"), ("flux", "sd3_net", "Stable Diffusion 3")],
)
def test_other_family_refused_before_weights(world, monkeypatch, base, net, control_family):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(base_module, "load_base", no_weights)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as error:
        ControlNetPipeline.from_pretrained(str(world[base]), controlnets=[world[net]])
    elapsed = time.perf_counter() - start
    message = str(error.value)
    assert "\n" not in message and WRONG in message
    assert control_family in message.split(", but")[0] and world[base].name in message
    assert elapsed < 2.0, elapsed


def test_refusals_name_the_setting(world):
    pipe = _pipe(world, "sd3", ["net"])
    image = Image.open(world["cond0"]).convert("RGB")
    cases = {
        "image .img2img.: on an SD3 base": {"image": image},
        "scheduler='ddim'": {"scheduler": "ddim"},
        "clip_skip=1": {"clip_skip": 1},
    }
    for name, options in cases.items():
        with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")) as error:
            run_job(pipe, _job(world, "sd3", [("net", {})], **options))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"control_mode\[0\]='controlnet'"):
        run_job(pipe, _job(world, "sd3", [("net", {"mode": "controlnet"})]))
    with pytest.raises(ValueError, match=r"block_scales\[0\]"):
        run_job(pipe, _job(world, "sd3", [("net", {"block_scales": [1.0, 1.0]})]))
    flux = _pipe(world, "flux", ["net"])
    with pytest.raises(ValueError, match="negative_prompt"):
        run_job(flux, _job(world, "flux", [("net", {})], negative_prompt="a dog"))


def test_transformer_folder_checked_and_loaded_in_its_dtype(world, tmp_path):
    source = check_base(str(world["sd3"]))
    assert source.arch == "sd3" and "text_encoder_3" in source.components
    assert base_module.base_family(source).arch == "sd3"
    with pytest.raises(ValueError, match="prediction_type"):
        check_base(str(world["flux"]), prediction_type="epsilon")
    bf16 = write_flux_base(tmp_path / "flux_bf16", dtype=torch.bfloat16)
    base = load_base(str(bf16))
    assert {p.dtype for m in base.modules() for p in m.parameters()} == {torch.bfloat16}
    assert base.sampling.steps == 4  # no guidance embedding: schnell's defaults


# ------------------------------------------------------------------------------------------------------------
# (e) Flux's true CFG (a negative prompt, a second transformer pass per step) equals diffusers'
def test_flux_true_cfg_equals_diffusers(world):
    from diffusers import FluxControlNetPipeline

    pipe = _pipe(world, "flux", ["net"])
    ours = run_job(
        pipe, _job(world, "flux", [("net", {"scale": 0.7})], true_cfg_scale=2.5, negative_prompt="a dog")
    )
    b = pipe.base
    scheduler = type(b.scheduler).from_config(b.scheduler.config)
    reference = FluxControlNetPipeline(
        scheduler,
        b.vae,
        b.text_encoder,
        b.tokenizer,
        b.text_encoder_2,
        b.tokenizer_2,
        b.transformer,
        pipe.controlnets[0],
    )
    expected = reference(
        prompt="a red cat on a blue circle",
        negative_prompt="a dog",
        true_cfg_scale=2.5,
        guidance_scale=0.0,
        control_image=Image.open(world["cond0"]).convert("RGB"),
        controlnet_conditioning_scale=0.7,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images
    assert np.array_equal(ours.array, expected)  # the bound: exact
    assert ours.settings["true_cfg_scale"] == 2.5
    without = run_job(pipe, _job(world, "flux", [("net", {"scale": 0.7})]))
    assert np.abs(without.array - ours.array).max() > 1e-3  # true CFG acts
    from controlnet.generate.transformer_pipeline import refusals

    assert refusals(GenerationOptions(true_cfg_scale=2.0), "sd3", 1)[0][0] == "true_cfg_scale"  # Flux's only
    assert refusals(GenerationOptions(negative_prompt="a dog"), "flux", 1)[0][0] == "negative_prompt"  # needs it


# ------------------------------------------------------------------------------------------------------------
# (f) publishers' hint conventions: Stability's SD3.5 canny and depth nets take the condition as ComfyUI's loader
# feeds them (written out here: canny x * 255 * 0.5 + 0.5, depth 1 - x, on the [0, 1] image; blur as is)
CONVENTIONS = {1.0: lambda x: x * 255 * 0.5 + 0.5, 2.0: lambda x: 1.0 - x, 0.0: None}


def _stability_net(world, tmp_path, control_type: float):
    from diffusers import SD3ControlNetModel

    net = SD3ControlNetModel.from_pretrained(world["sd3_net"])
    net.register_to_config(stability_control_type={"value": control_type, "dtype": "float32", "shape": []})
    net.save_pretrained(tmp_path / f"stability-{control_type}")
    return tmp_path / f"stability-{control_type}"


def test_a_stability_nets_condition_follows_its_publishers_convention(world, tmp_path):
    from controlnet.generate.transformer_pipeline import publisher_hint
    from controlnet.io.api import load_controlnet

    image = Image.open(world["cond0"]).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
    for control_type, convention in CONVENTIONS.items():
        net = load_controlnet(_stability_net(world, tmp_path, control_type))  # the type survives loading
        hint = publisher_hint(net, image)
        if convention is None:
            assert hint is image
        else:
            assert torch.equal(hint, convention(x))
    assert publisher_hint(load_controlnet(world["sd3_net"]), image) is image  # other publishers: the image


def test_the_convention_reaches_the_pipeline(world, tmp_path):
    """A canny-typed net draws another image than the same weights untyped; a blur-typed one the same image."""
    images = {}
    for control_type in (1.0, 0.0):
        path = _stability_net(world, tmp_path, control_type)
        pipe = ControlNetPipeline.from_pretrained(str(world["sd3"]), controlnets=[path])
        images[control_type] = run_job(pipe, _job({**world, "sd3_typed": path}, "sd3", [("typed", {})])).array
    plain = run_job(_pipe(world, "sd3", ["net"]), _job(world, "sd3", [("net", {})])).array
    assert np.array_equal(images[0.0], plain) and np.abs(images[1.0] - plain).max() > 1e-3


# ------------------------------------------------------------------------------------------------------------
# (g) a Flux union net (InstantX/Shakker: num_mode) takes its condition's type as diffusers' control_mode
def test_flux_union_net_takes_its_mode(world, tmp_path):
    from diffusers import FluxControlNetPipeline

    transformer = load_base(str(world["flux"])).transformer
    torch.manual_seed(0)
    net = FluxControlNet.from_transformer(transformer, num_layers=2, num_single_layers=1, num_mode=7)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_", "pos_embed_input")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_pretrained(tmp_path / "union")
    world = {**world, "flux_union": tmp_path / "union"}
    pipe = _pipe(world, "flux", ["union"])
    ours = run_job(pipe, _job(world, "flux", [("union", {"control_type": "depth", "scale": 0.8})]))
    b = pipe.base
    reference = FluxControlNetPipeline(
        type(b.scheduler).from_config(b.scheduler.config), b.vae, b.text_encoder, b.tokenizer, b.text_encoder_2,
        b.tokenizer_2, b.transformer, pipe.controlnets[0],
    )  # fmt: skip
    expected = reference(
        prompt="a red cat on a blue circle",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
        guidance_scale=0.0,
        control_image=Image.open(world["cond0"]).convert("RGB"),
        control_mode=2,  # depth in InstantX's ids, written out here
        controlnet_conditioning_scale=0.8,
    ).images
    assert np.array_equal(ours.array, expected) and ours.settings["controlnets"][0]["control_type"] == "depth"
    canny = run_job(pipe, _job(world, "flux", [("union", {"control_type": "canny", "scale": 0.8})]))
    assert np.abs(canny.array - ours.array).max() > 1e-5  # the mode reaches the net (ours is exact: 0 noise)
    with pytest.raises(ValueError, match=r"control_type\[0\]: ControlNet 0 is a Flux union ControlNet; name") as e:
        run_job(pipe, _job(world, "flux", [("union", {})]))
    assert "canny 0, tile 1, depth 2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"control_type\[0\]='canny': ControlNet 0 is not a union ControlNet"):
        run_job(_pipe(world, "flux", ["net"]), _job(world, "flux", [("net", {"control_type": "canny"})]))


@pytest.mark.parametrize("arch", ARCHES)
def test_one_condition_image_per_prompt(world, arch):
    """A list of one condition image per prompt (as the UNet pipeline takes, what `controlnet evaluate` sends): the
    same image for both prompts equals the one-image call; another image for the second prompt changes only that
    prompt's image; a list of the wrong length is refused naming the counts."""
    pipe = _pipe(world, arch, ["net"])
    a, b = (Image.open(world[f"cond{k}"]).convert("RGB") for k in range(2))
    prompts = ["a red cat", "a blue dog"]
    flux = {"guidance_scale": 0.0} if arch == "flux" else {}
    common = dict(steps=STEPS, width=SIZE, height=SIZE, seed=3, output_type="np", **flux)
    with torch.inference_mode():
        one = pipe(prompts, [a], **common).array
        same = pipe(prompts, [[a, a]], **common).array
        mixed = pipe(prompts, [[a, b]], **common).array
    np.testing.assert_array_equal(same, one)
    np.testing.assert_array_equal(mixed[0], one[0])
    assert np.abs(mixed[1] - one[1]).max() > 1e-3
    with pytest.raises(ValueError, match=r"control\[0\]: 1 condition images for 2 prompts"):
        pipe(prompts, [[a]], **common)

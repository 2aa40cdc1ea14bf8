"""SD3 / Flux bases from single files (issue 29 item 3): Stability's SD3 checkpoints with or without their VAE and text
encoders inside, BFL's Flux transformer files with ae.safetensors and text encoder folders.

The files are written in the test from tiny diffusers folders (testing/tiny_transformer_bases.py: our key tables
inverted), so each file holds exactly the folder's weights; a tiny architecture's values that no weight says (the
VAE's groups, CLIP's heads, Flux's rotary axes) come in the base config JSON the writers put beside it. Bound of the
image comparisons: exact (`np.array_equal`), the same modules in the same dtype running the same pipeline.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.errors import CheckpointError
from controlnet.generate import transformer_base
from controlnet.generate.base import check_base, check_controlnet_families, load_base
from controlnet.generate.jobs import run_job
from controlnet.generate.options import BaseParts, ControlUnit, GenerationJob, GenerationOptions
from controlnet.generate.pipeline import ControlNetPipeline
from controlnet.io import safe_load
from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet
from controlnet.testing.ldm_files import write_controlnet_file
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS
from controlnet.testing.tiny_transformer_bases import (
    write_flux_base,
    write_flux_files,
    write_sd3_base,
    write_sd3_file,
)

PARAMS = ("weight", "bias")
SIZE = 32
STEPS = 2
PROMPT = "a red cat on a blue circle"
WRONG = "a ControlNet works only with a base of the family it was trained on"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_files")
    w = {"sd3": write_sd3_base(root / "sd3"), "flux": write_flux_base(root / "flux")}
    w["sd3_all"], w["sd3_config"] = write_sd3_file(w["sd3"], root / "sd3_all.safetensors")
    w["sd3_bare"], w["sd3_bare_config"] = write_sd3_file(w["sd3"], root / "sd3_bare.safetensors", encoders=False)
    w["flux_file"], w["ae"], w["flux_config"] = write_flux_files(w["flux"], root / "bfl")
    w["flux_prefixed"], _, _ = write_flux_files(w["flux"], root / "bfl_prefixed", prefix="model.diffusion_model.")
    torch.manual_seed(0)
    w["sd3_net"] = root / "sd3_net"
    SD3ControlNet.from_transformer(load_base(str(w["sd3"])).transformer, num_layers=1).save_pretrained(
        w["sd3_net"]
    )
    w["flux_net"] = root / "flux_net"
    flux_transformer = load_base(str(w["flux"])).transformer
    FluxControlNet.from_transformer(flux_transformer, num_layers=1, num_single_layers=0).save_pretrained(
        w["flux_net"]
    )
    w["unet_net"] = write_controlnet_file(root / "control_sd15.safetensors", TINY_UNET_CONFIGS["sd15"])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "cond.png")
    w["cond"] = root / "cond.png"
    return w


def sd3_options(w, form: str) -> dict:
    """check_base keywords of an SD3 file form: all-in-one (the T5 tokenizer folder alone), or bare + folders."""
    if form == "all-in-one":
        return {
            "tokenizer": str(w["sd3"] / "tokenizer"),
            "tokenizer_2": str(w["sd3"] / "tokenizer_2"),
            "t5": str(w["sd3"] / "tokenizer_3"),
            "configs": str(w["sd3_config"]),
        }
    return {
        "clip_l": str(w["sd3"] / "text_encoder"),
        "clip_g": str(w["sd3"] / "text_encoder_2"),
        "t5": str(w["sd3"] / "text_encoder_3"),
        "configs": str(w["sd3_bare_config"]),
    }


def flux_options(w) -> dict:
    return {
        "vae": str(w["ae"]),
        "clip_l": str(w["flux"] / "text_encoder"),
        "t5": str(w["flux"] / "text_encoder_2"),
        "configs": str(w["flux_config"]),
    }


def _image(w, base, arch: str, **options):
    # a checked source carries the parts (ControlNetPipeline.from_pretrained passes only the UNet bases' options
    # to check_base; the CLI checks first, as here)
    source = check_base(str(base), **options)
    pipe = ControlNetPipeline.from_pretrained(source, controlnets=[w[f"{arch}_net"]], **options)
    unit = ControlUnit(model=str(w[f"{arch}_net"]), image=Image.open(w["cond"]).convert("RGB"))
    job = GenerationJob(
        prompt=PROMPT,
        base=str(base),
        units=[unit],
        options=GenerationOptions(steps=STEPS, width=SIZE, height=SIZE, seed=3),
    )
    return run_job(pipe, job).array


# ------------------------------------------------------------------------------------------------------------
# each form loads the folder's weights (bit for bit) and gives the folder's image
FORMS = {
    "sd3-all-in-one": ("sd3", "sd3_all"),
    "sd3-bare+folders": ("sd3", "sd3_bare"),
    "flux-bare-keys": ("flux", "flux_file"),
    "flux-model.diffusion_model.": ("flux", "flux_prefixed"),
}


def form_options(w, form: str) -> dict:
    arch, _ = FORMS[form]
    return sd3_options(w, form.removeprefix("sd3-")) if arch == "sd3" else flux_options(w)


@pytest.fixture(scope="module")
def folder_bases(world):
    return {arch: load_base(str(world[arch])) for arch in ("sd3", "flux")}


@pytest.fixture(scope="module")
def folder_images(world):
    return {arch: _image(world, world[arch], arch) for arch in ("sd3", "flux")}


@pytest.mark.parametrize("form", FORMS)
def test_each_file_form_loads_the_folders_weights(world, folder_bases, form):
    arch, file = FORMS[form]
    source = check_base(str(world[file]), **form_options(world, form))
    assert source.arch == arch and source.components[0] == "checkpoint" and source.components[-1] == "scheduler"
    base, folder = load_base(source), folder_bases[arch]
    for module in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")[
        : 5 if arch == "sd3" else 4
    ]:
        ours, theirs = getattr(base, module).state_dict(), getattr(folder, module).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), module
    assert type(base.scheduler) is type(folder.scheduler)
    assert {k: v for k, v in base.scheduler.config.items() if not k.startswith("_")} == {
        k: v for k, v in folder.scheduler.config.items() if not k.startswith("_")
    }
    assert base.sampling == folder.sampling  # Flux: no guidance embedding, schnell's defaults, from the header


# The weights are bit-identical (above); the images agree to float32 rounding: a memory-mapped tensor is not
# aligned as a freshly allocated one is, and the CPU kernels may sum in another order (seen: a few 1e-8).
IMAGE_BOUND = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_each_file_form_gives_the_folders_image(world, folder_images, form):
    arch, file = FORMS[form]
    ours = _image(world, world[file], arch, **form_options(world, form))
    torch.testing.assert_close(
        torch.from_numpy(ours), torch.from_numpy(folder_images[arch]), atol=IMAGE_BOUND, rtol=0
    )


def test_our_key_tables_match_diffusers_from_single_file(world, tmp_path):
    """The files we write load through diffusers' own single-file loaders (SD3 transformer, BFL/LDM VAE) to the
    folder's exact weights: our tables and their converters agree."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_single_file(
        str(world["sd3_all"]), config=str(world["sd3"]), subfolder="transformer", local_files_only=True
    )
    vae = AutoencoderKL.from_single_file(
        str(world["ae"]), config=str(world["flux"]), subfolder="vae", local_files_only=True
    )
    folder = {"sd3": load_base(str(world["sd3"])), "flux": load_base(str(world["flux"]))}
    for module, reference in ((transformer, folder["sd3"].transformer), (vae, folder["flux"].vae)):
        ours, theirs = module.state_dict(), reference.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_bf16_file_loads_in_bf16_without_a_copy(world, tmp_path):
    """A bf16 file is loaded in bf16 (`dtype` None: the file's), and its transformer's tensors are the file's
    mapping itself (views, no copy in any dtype), except the few whose (shift, scale) halves change places."""
    path, config = write_sd3_file(world["sd3"], tmp_path / "sd3_bf16.safetensors", dtype=torch.bfloat16)
    base = load_base(str(path), **{**sd3_options(world, "all-in-one"), "configs": str(config)})
    assert {p.dtype for m in base.modules() for p in m.parameters()} == {torch.bfloat16}
    spans = safe_load._file_mappings()

    def mapped(tensor):
        return any(start <= tensor.data_ptr() < end for start, end in spans)

    copied = sorted(n for n, p in base.transformer.state_dict().items() if not mapped(p))
    last = base.transformer.config.num_layers - 1
    swapped = {
        f"{p}.{x}" for p in ("norm_out.linear", f"transformer_blocks.{last}.norm1_context.linear") for x in PARAMS
    }
    assert set(copied) == swapped


# ------------------------------------------------------------------------------------------------------------
# the command line
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_generate_cli_with_a_base_file(world, folder_images, tmp_path, arch):
    out = tmp_path / "out"
    if arch == "sd3":
        options = sd3_options(world, "all-in-one")
        base = world["sd3_all"]
    else:
        options = flux_options(world)
        base = world["flux_file"]
    flags = {"tokenizer_2": "--tokenizer-2", "configs": "--base-config"}
    cmd = [sys.executable, "-m", "controlnet.cli", "generate", PROMPT, "--base", str(base)]
    for key, value in options.items():
        cmd += [flags.get(key, "--" + key.replace("_", "-")), value]
    cmd += ["--controlnet", str(world[f"{arch}_net"]), "--cond", str(world["cond"]), "--steps", str(STEPS)]
    cmd += ["--width", str(SIZE), "--height", str(SIZE), "--seed", "3", "--out", str(out), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads(Image.open(out / "controlnet-3.png").text["controlnet"])
    assert settings["arch"] == arch and settings["base"] == str(base)
    expected = _image(world, world[arch], arch)
    assert np.array_equal(
        np.asarray(Image.open(out / "controlnet-3.png")), (expected[0] * 255).round().astype(np.uint8)
    )


def test_base_flags_are_the_schemas():
    import dataclasses

    from controlnet.generate.commands import BASE_FLAGS
    from controlnet.settings_cli import flag_names

    for f in dataclasses.fields(BaseParts):
        assert BASE_FLAGS[f.name] == flag_names(f)[0]


# ------------------------------------------------------------------------------------------------------------
# refusals: one line each, before any weights are read
@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(safe_load, "map_state_dict", refuse)
    monkeypatch.setattr(transformer_base, "load_transformer_file", refuse)


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_flux_without_t5_is_refused_naming_the_option(world, no_weights):
    options = {k: v for k, v in flux_options(world).items() if k != "t5"}
    with pytest.raises(ValueError) as error:
        check_base(str(world["flux_file"]), **options, flags={"t5": "--t5"})
    assert "--t5 DIR" in _one_line(error) and "hold no text encoder" in str(error.value)
    with pytest.raises(ValueError) as error:
        check_base(str(world["flux_file"]), **{k: v for k, v in options.items() if k != "vae"})
    assert "vae PATH" in _one_line(error) and "ae.safetensors" in str(error.value)


def test_sd3_without_t5_loads_with_a_note(world, caplog):
    options = {k: v for k, v in sd3_options(world, "bare+folders").items() if k != "t5"}
    with caplog.at_level(logging.WARNING):
        source = check_base(str(world["sd3_bare"]), **options)
    assert "text_encoder_3" not in source.components
    assert any("no T5 text encoder" in r.getMessage() and "long" in r.getMessage() for r in caplog.records)
    base = load_base(source)
    assert base.text_encoder_3 is None and base.tokenizer_3 is None


@pytest.mark.slow
def test_sd3_without_t5_generates(world):
    options = {k: v for k, v in sd3_options(world, "bare+folders").items() if k != "t5"}
    source = check_base(str(world["sd3_bare"]), **options)
    unit = ControlUnit(model=str(world["sd3_net"]), image=Image.open(world["cond"]).convert("RGB"))
    pipe = ControlNetPipeline.from_pretrained(source, controlnets=[world["sd3_net"]])
    options = GenerationOptions(steps=STEPS, width=SIZE, height=SIZE, seed=3)
    image = run_job(pipe, GenerationJob(prompt=PROMPT, base=str(world["sd3_bare"]), units=[unit], options=options))
    assert image.array.shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize(
    "base, net, control_family",
    [
        ("sd3_all", "unet_net", "SD1"),
        ("sd3_all", "flux_net", "Flux"),
        ("flux_file", "sd3_net", "Stable Diffusion 3"),
    ],
)
def test_other_family_refused_from_the_files(world, no_weights, base, net, control_family):
    options = sd3_options(world, "all-in-one") if base == "sd3_all" else flux_options(world)
    source = check_base(str(world[base]), **options)
    with pytest.raises(CheckpointError) as error:
        check_controlnet_families(source, [world[net]])
    message = _one_line(error)
    assert WRONG in message and control_family in message.split(", but")[0] and world[base].name in message


def test_fp8_and_gguf_base_files_refused_in_one_line(world, tmp_path, no_weights):
    from safetensors.torch import load_file, save_file

    state = load_file(str(world["flux_file"]))
    fp8 = tmp_path / "flux1-dev-fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in state.items()}, str(fp8))
    with pytest.raises(CheckpointError) as error:
        check_base(str(fp8), **flux_options(world))
    assert "fp8" in _one_line(error) and "bf16/fp16/fp32" in str(error.value)
    gguf = tmp_path / "flux1-dev-Q4_K_S.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(CheckpointError) as error:
        check_base(str(gguf), **flux_options(world))
    assert "GGUF" in _one_line(error)


def test_parts_refused_for_other_bases_and_bad_configs(world, tmp_path):
    with pytest.raises(ValueError, match="only for an SD3/Flux checkpoint file") as error:
        check_base(str(world["sd3"]), t5=str(world["sd3"] / "text_encoder_3"))
    _one_line(error)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"unet": {}}))
    with pytest.raises(ValueError, match="'unet' is not a component") as error:
        check_base(str(world["flux_file"]), **{**flux_options(world), "configs": str(bad)})
    _one_line(error)
    # Flux's rotary axes are in no weight: a 16-wide-head file without the config is refused asking for it
    with pytest.raises(CheckpointError, match="rotary axes for 16-wide heads") as error:
        check_base(str(world["flux_file"]), **{k: v for k, v in flux_options(world).items() if k != "configs"})
    assert "base_config" in _one_line(error) or "configs" in str(error.value)


@pytest.mark.parametrize("key", ["model.diffusion_model.joint_blocks.0.x", "double_blocks.0.x"])
def test_an_incomplete_transformer_file_is_refused_in_one_line(tmp_path, key):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a complete checkpoint") as error:
        check_base(str(path))
    _one_line(error)

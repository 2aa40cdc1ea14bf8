"""Transformer bases (SD3, Flux) through the REAL server (subprocess, loopback): the registry lists them and their
ControlNets, and one job gives the same pixels through `controlnet generate`, /v1/generate and the web-UI API.

The models folder holds a tiny SD3 and a tiny Flux base as diffusers folders (testing/tiny_transformer_bases.py),
an SD3 and a Flux ControlNet folder, and an SD3 and a Flux ControlNet as single files (diffusers names): each found
by its header (io/formats.py `detect_format`), never by its name. What the transformer pipeline refuses
(generate/transformer_pipeline.py `refusals`) is a 422 naming the setting before queueing (POST /v1/jobs answers it,
with no job made), and a job over the pixel-step budget is priced like any other.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from controlnet.testing.live_server import start_server

SIZE = 32  # pixels (the tiny VAE has factor 1)
STEPS = 2
ARCHES = ("sd3", "flux")
SEED = 5


def write_transformer_models(folder):
    """tiny_sd3/, tiny_flux/ (bases), {arch}_canny/ (ControlNet folders), {arch}_depth.safetensors (single files in
    diffusers names); each net's zero layers given small random values so that it acts."""
    from safetensors.torch import save_file

    from controlnet.generate.base import load_base
    from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet
    from controlnet.testing.tiny_transformer_bases import write_flux_base, write_sd3_base

    write_sd3_base(folder / "tiny_sd3")
    write_flux_base(folder / "tiny_flux")
    for arch in ARCHES:
        transformer = load_base(str(folder / f"tiny_{arch}")).transformer
        for name, seed in (("canny", 7), ("depth", 8)):
            if arch == "sd3":
                net = SD3ControlNet.from_transformer(transformer, num_layers=2)
            else:
                net = FluxControlNet.from_transformer(transformer, num_layers=2, num_single_layers=1)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for key, p in net.named_parameters():
                    if key.startswith(("controlnet_", "pos_embed_input")):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            if name == "canny":
                net.save_pretrained(folder / f"{arch}_canny")
            else:
                state = {k: v.contiguous() for k, v in net.state_dict().items()}
                save_file(state, str(folder / f"{arch}_depth.safetensors"))
    return folder


@pytest.fixture(scope="module")
def transformer_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("transformer_models")
    write_transformer_models(models)
    cond = models.parent / "cond.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(cond)
    return models


@pytest.fixture(scope="module")
def server(transformer_models, tmp_path_factory):
    srv = start_server(transformer_models, tmp_path_factory.mktemp("log") / "server.log", "--no-ui")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture
def url(server):
    yield server.url
    assert httpx.get(server.url + "/v1/health").status_code == 200  # still serving after every test


def b64(path) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",")[-1]))).convert("RGB"))


def native_body(arch: str, cond, net: str = "canny", **options) -> dict:
    unit = {"model": f"{arch}_{net}", "image": b64(cond), "scale": 0.8, "end": 0.5}
    body = {"prompt": "a red cat", "base": f"tiny_{arch}", "steps": STEPS, "seed": SEED, "width": SIZE}
    return {**body, "height": SIZE, "guidance_scale": 4.0 if arch == "sd3" else 0.0, "units": [unit], **options}


def webui_body(arch: str, cond, net: str = "canny", **extra) -> dict:
    """The same job as `native_body` in the web UI's words (one ControlNet unit in alwayson_scripts)."""
    unit = {"enabled": True, "model": f"{arch}_{net}", "image": b64(cond), "weight": 0.8, "guidance_end": 0.5}
    unit.update(module="none", pixel_perfect=False, resize_mode="Just Resize")
    body = {"prompt": "a red cat", "steps": STEPS, "seed": SEED, "width": SIZE, "height": SIZE}
    body.update(cfg_scale=4.0 if arch == "sd3" else 0.0, sampler_name="Euler")
    return {**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}, **extra}


# -------------------------------------------------------------------------------------------------------------
def test_registry_lists_transformer_bases_and_nets(url):
    models = {m["name"]: m for m in httpx.get(url + "/v1/models").json()}
    for arch in ARCHES:
        assert (models[f"tiny_{arch}"]["kind"], models[f"tiny_{arch}"]["family"]) == ("base", arch)
        for name, condition in (("canny", "canny"), ("depth", "depth")):
            entry = models[f"{arch}_{name}"]
            assert (entry["kind"], entry["family"], entry["condition"]) == ("controlnet", arch, condition)
    titles = {m["model_name"]: m["title"] for m in httpx.get(url + "/sdapi/v1/sd-models").json()}
    assert {"tiny_sd3", "tiny_flux"} <= set(titles)
    nets = httpx.get(url + "/controlnet/model_list").json()["model_list"]
    assert {t.split(" [")[0] for t in nets} >= {"sd3_canny", "sd3_depth", "flux_canny", "flux_depth"}


# SD3's is slow: the first SD3 job imports and loads three text encoders (10-18 s on 2 shared cores)
@pytest.mark.parametrize("arch", [pytest.param("sd3", marks=pytest.mark.slow), "flux"])
def test_same_pixels_native_and_webui(url, transformer_models, arch):
    """/v1/generate, txt2img naming the base in override_settings, and txt2img after POST /sdapi/v1/options
    switched the checkpoint: one image, pixel for pixel; the net acts (scale 0 differs)."""
    cond = transformer_models.parent / "cond.png"
    native = httpx.post(url + "/v1/generate", json=native_body(arch, cond), timeout=120)
    assert native.status_code == 200, native.text
    expected = pixels(native.json()["images"][0])
    assert expected.shape == (SIZE, SIZE, 3)
    title = next(
        m["title"] for m in httpx.get(url + "/sdapi/v1/sd-models").json() if m["model_name"] == f"tiny_{arch}"
    )
    named = webui_body(arch, cond, override_settings={"sd_model_checkpoint": title})
    webui = httpx.post(url + "/sdapi/v1/txt2img", json=named, timeout=120)
    assert webui.status_code == 200, webui.text
    np.testing.assert_array_equal(pixels(webui.json()["images"][0]), expected)
    switched = httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": title})
    assert switched.status_code == 200 and switched.json()["sd_model_checkpoint"] == title
    try:
        webui = httpx.post(url + "/sdapi/v1/txt2img", json=webui_body(arch, cond), timeout=120)
        assert webui.status_code == 200, webui.text
        np.testing.assert_array_equal(pixels(webui.json()["images"][0]), expected)
    finally:
        httpx.post(url + "/sdapi/v1/options", json={"sd_model_checkpoint": "builtin"})
    body = native_body(arch, cond)
    body["units"][0]["scale"] = 0.0
    off = httpx.post(url + "/v1/generate", json=body, timeout=120)
    assert np.abs(pixels(off.json()["images"][0]).astype(int) - expected).max() > 0


def test_single_file_net_generates(url, transformer_models):
    """An SD3 ControlNet given as one .safetensors file (diffusers names, as InstantX/Shakker publish) serves too.
    (A tiny Flux file is listed but not run: its 16-wide heads' rotary axes are in no weight, so the loader asks for
    its config.json; Flux's real 128-wide heads are read from the file.)"""
    cond = transformer_models.parent / "cond.png"
    answer = httpx.post(url + "/v1/generate", json=native_body("sd3", cond, net="depth"), timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["settings"]["controlnets"][0]["model"] == "sd3_depth"


REFUSED = [  # (arch, native body changes, field, text in the detail)
    ("sd3", {"scheduler": "ddim"}, "scheduler", "flow-matching Euler only"),
    ("sd3", {"eta": 0.5}, "eta", "eta=0.5"),
    ("flux", {"guidance_scale": 3.5}, "guidance_scale", "no guidance embedding"),
    ("sd3", {"units": "mode=controlnet"}, "units[0].mode", "only balanced"),
    ("flux", {"units": "none"}, "units", "needs a ControlNet unit"),
    ("sd3", {"units": "flux"}, "units[0].model", "a ControlNet for Flux"),
]


@pytest.mark.parametrize("arch, change, field, text", REFUSED, ids=[f"{r[0]}-{r[2]}" for r in REFUSED])
def test_refused_settings_are_422_before_queueing(url, transformer_models, arch, change, field, text):
    """POST /v1/jobs answers 422 naming the setting (no job is made: a queued job would be 202 and fail later)."""
    body = native_body(arch, transformer_models.parent / "cond.png")
    units = change.pop("units", None)
    if units == "mode=controlnet":
        body["units"][0]["mode"] = "controlnet"
    elif units == "none":
        body["units"] = []
    elif units == "flux":
        body["units"][0]["model"] = "flux_canny"
    body.update(change)
    started = time.monotonic()
    answer = httpx.post(url + "/v1/jobs", json=body, timeout=30)
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["field"] == field and text in problem["detail"] and "\n" not in problem["detail"]
    assert time.monotonic() - started < 2.0


def test_webui_refusals_name_the_webui_field(url, transformer_models):
    """The web-UI API names the setting in its own words: sampler_name for a sampler the base has not, cfg_scale for
    the web UI's default CFG (7) on a Flux base without guidance embedding."""
    cond = transformer_models.parent / "cond.png"
    base = {"override_settings": {"sd_model_checkpoint": "tiny_sd3"}}
    answer = httpx.post(url + "/sdapi/v1/txt2img", json=webui_body("sd3", cond, sampler_name="DDIM", **base))
    assert answer.status_code == 422 and answer.json()["field"] == "sampler_name", answer.text
    body = webui_body("flux", cond, override_settings={"sd_model_checkpoint": "tiny_flux"})
    body.pop("cfg_scale")
    answer = httpx.post(url + "/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 422 and answer.json()["field"] == "cfg_scale", answer.text
    assert "guidance_scale=7.0" in answer.json()["detail"]


def test_transformer_jobs_are_priced(url, transformer_models):
    """The pixel-step budget (serve/limits.py) counts a transformer job as any other: 2048 px x 150 steps is over."""
    body = native_body("flux", transformer_models.parent / "cond.png", width=2048, height=2048, steps=150)
    answer = httpx.post(url + "/v1/jobs", json=body)
    assert answer.status_code == 422 and "pixel-steps" in answer.json()["detail"], answer.text


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHES)
def test_same_pixels_as_controlnet_generate(url, transformer_models, tmp_path, arch):
    """`controlnet generate` (CLI subprocess, one thread as the server) writes the PNG /v1/generate returns."""
    cond = transformer_models.parent / "cond.png"
    cmd = [
        sys.executable,
        "-m",
        "controlnet.cli",
        "generate",
        "a red cat",
        "--base",
        str(transformer_models / f"tiny_{arch}"),
    ]
    cmd += ["--controlnet", str(transformer_models / f"{arch}_canny"), "--cond", str(cond), "--scale", "0.8"]
    cmd += ["--control-end", "0.5", "--steps", str(STEPS), "--seed", str(SEED), "--width", str(SIZE)]
    cmd += ["--height", str(SIZE), "--cfg", "4" if arch == "sd3" else "0", "--out", str(tmp_path), "--name", "cli"]
    cmd += ["--device", "cpu"]
    # one CPU thread, as the server (--threads 1): float sums in another order differ in the last bit
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stderr[-2000:]
    native = httpx.post(url + "/v1/generate", json=native_body(arch, cond), timeout=120)
    assert native.status_code == 200, native.text
    cli = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    np.testing.assert_array_equal(pixels(native.json()["images"][0]), cli)

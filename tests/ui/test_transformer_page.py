"""The web page with a transformer base, in headless chromium against a real server: a tiny Flux base picked in the
page's base list, a Flux ControlNet and an uploaded condition map give an image, and that image equals what
/v1/generate returns for the same settings (the serve tests tie /v1/generate to the web-UI
API and `controlnet generate`: one job, the same pixels through every door). One browser test: they are slow."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from browser import choose, decode, image_bytes, open_page, set_number, status_text, upload
from PIL import Image

from controlnet.testing.live_server import start_server
from controlnet.ui.form import data_uri

SIZE = 32
STEPS = 2


def _acting(net, seed: int = 7):
    """`net` with its zero layers given small random values, so that it acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if key.startswith(("controlnet_", "pos_embed_input")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def write_flux_models(folder):
    """tiny_flux/ and tiny_sd3/ (bases, diffusers folders), flux_canny/ and sd3_canny/ (ControlNets copied from them)."""
    from controlnet.generate.base import load_base
    from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet
    from controlnet.testing.tiny_transformer_bases import write_flux_base, write_sd3_base

    write_flux_base(folder / "tiny_flux")
    flux = load_base(str(folder / "tiny_flux")).transformer
    _acting(FluxControlNet.from_transformer(flux, num_layers=2, num_single_layers=1)).save_pretrained(
        folder / "flux_canny"
    )
    write_sd3_base(folder / "tiny_sd3", t5=False)
    sd3 = load_base(str(folder / "tiny_sd3")).transformer
    _acting(SD3ControlNet.from_transformer(sd3, num_layers=2)).save_pretrained(folder / "sd3_canny")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = write_flux_models(tmp_path_factory.mktemp("flux_models"))
    srv = start_server(models, tmp_path_factory.mktemp("ui-server") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def page_equals_api(page, server, tmp_path, base: str, model: str, arch: str, cfg: float) -> None:
    """Generate on the page with `base` and `model`, then the same settings through POST /v1/generate: same pixels."""
    cond = tmp_path / "cond.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(cond)
    foreign = open_page(page, server.url)
    choose(page, "base", base)
    page.locator("#prompt textarea").fill("a red cat")
    for elem_id, value in (("steps", STEPS), ("cfg", cfg), ("seed", 77), ("width", SIZE), ("height", SIZE)):
        set_number(page, elem_id, value)
    choose(page, "unit0_model", model)
    upload(page, "unit0_map", cond)
    page.wait_for_selector("#unit0_map img")
    page.locator("#generate").click()
    png, _ = image_bytes(page, "#gallery")
    image = decode(png)
    assert image.size == (SIZE, SIZE) and "Done: 1 image(s)" in status_text(page)
    settings = json.loads(image.info["controlnet"])
    assert settings["arch"] == arch and settings["base"] == base and settings["seed"] == 77

    # the same settings as a POST /v1/generate body, written here (the page's own "copy as API request" is tested
    # with the UNet base in test_page.py)
    body = {"prompt": "a red cat", "base": base, "steps": STEPS, "guidance_scale": cfg, "seed": 77}
    body.update(width=SIZE, height=SIZE, units=[{"model": model, "image": data_uri(Image.open(cond))}])
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    from controlnet.serve.images import decode_image

    api_image = np.asarray(decode_image(response.json()["images"][0], "api").convert("RGB"))
    assert (api_image == np.asarray(image.convert("RGB"))).all(), "the page and the API gave different pixels"
    assert foreign == [], f"the page reached beyond loopback: {foreign}"


@pytest.mark.slow  # 70-75 s on 2 shared cores: chromium, a server with the page, a Flux base loaded
def test_flux_base_on_the_page_equals_the_api(page, server, tmp_path):
    page_equals_api(page, server, tmp_path, "tiny_flux", "flux_canny", "flux", 0)


@pytest.mark.slow  # the same server: an SD3 base (CFG 2) picked on the page
def test_sd3_base_on_the_page_equals_the_api(page, server, tmp_path):
    page_equals_api(page, server, tmp_path, "tiny_sd3", "sd3_canny", "sd3", 2)


@pytest.fixture(scope="module")
def file_server(tmp_path_factory):
    """A server whose base is a tiny Flux transformer file (BFL's names), its parts given as server flags."""
    from controlnet.testing.tiny_transformer_bases import write_flux_files

    root = tmp_path_factory.mktemp("flux_file")
    parts, models = root / "parts", root / "models"
    write_flux_models(parts)  # tiny_flux/ (whose weights the file holds) and flux_canny/
    bfl, ae, config = write_flux_files(parts / "tiny_flux", parts / "bfl")
    models.mkdir()
    bfl.rename(models / "flux1-tiny.safetensors")
    (parts / "flux_canny").rename(models / "flux_canny")
    flags = ["--vae", str(ae), "--clip-l", str(parts / "tiny_flux" / "text_encoder"), "--base-config", str(config)]
    flags += ["--t5", str(parts / "tiny_flux" / "text_encoder_2")]
    srv = start_server(models, root / "server.log", "--base", "flux1-tiny", *flags)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.mark.slow  # a second server: a Flux base given as a single file
def test_flux_file_base_on_the_page_equals_the_api(page, file_server, tmp_path):
    page_equals_api(page, file_server, tmp_path, "flux1-tiny", "flux_canny", "flux", 0)


@pytest.fixture(scope="module")
def sd3_file_server(tmp_path_factory):
    """A server whose base is a tiny SD3 checkpoint file (Stability's names, no text encoders inside)."""
    from controlnet.testing.tiny_transformer_bases import write_sd3_file

    root = tmp_path_factory.mktemp("sd3_file")
    parts, models = root / "parts", root / "models"
    write_flux_models(parts)  # tiny_sd3/ (whose weights the file holds) and sd3_canny/
    models.mkdir()
    file, config = write_sd3_file(parts / "tiny_sd3", models / "sd3-tiny.safetensors", encoders=False)
    (parts / "sd3_canny").rename(models / "sd3_canny")
    flags = [
        "--clip-l",
        str(parts / "tiny_sd3" / "text_encoder"),
        "--clip-g",
        str(parts / "tiny_sd3" / "text_encoder_2"),
    ]
    srv = start_server(models, root / "server.log", "--base", "sd3-tiny", *flags, "--base-config", str(config))
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.mark.slow  # a third server: an SD3 base given as a single checkpoint file
def test_sd3_file_base_on_the_page_equals_the_api(page, sd3_file_server, tmp_path):
    page_equals_api(page, sd3_file_server, tmp_path, "sd3-tiny", "sd3_canny", "sd3", 2)

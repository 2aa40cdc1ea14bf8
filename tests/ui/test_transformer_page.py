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


def write_flux_models(folder):
    """tiny_flux/ (base) and flux_canny/ (a ControlNet copied from it, zero layers made non-zero so that it acts);
    the Flux half of tests/serve/test_transformer_bases.py `write_transformer_models`."""
    from controlnet.generate.base import load_base
    from controlnet.model.transformer_controlnet import FluxControlNet
    from controlnet.testing.tiny_transformer_bases import write_flux_base

    write_flux_base(folder / "tiny_flux")
    net = FluxControlNet.from_transformer(
        load_base(str(folder / "tiny_flux")).transformer, num_layers=2, num_single_layers=1
    )
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, p in net.named_parameters():
            if key.startswith("controlnet_"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_pretrained(folder / "flux_canny")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = write_flux_models(tmp_path_factory.mktemp("flux_models"))
    srv = start_server(models, tmp_path_factory.mktemp("ui-server") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.mark.slow  # 70-75 s on 2 shared cores: chromium, a server with the page, a Flux base loaded
def test_flux_base_on_the_page_equals_the_api(page, server, tmp_path):
    cond = tmp_path / "cond.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(cond)
    foreign = open_page(page, server.url)
    choose(page, "base", "tiny_flux")
    page.locator("#prompt textarea").fill("a red cat")
    for elem_id, value in (("steps", STEPS), ("cfg", 0), ("seed", 77), ("width", SIZE), ("height", SIZE)):
        set_number(page, elem_id, value)
    choose(page, "unit0_model", "flux_canny")
    upload(page, "unit0_map", cond)
    page.wait_for_selector("#unit0_map img")
    page.locator("#generate").click()
    png, _ = image_bytes(page, "#gallery")
    image = decode(png)
    assert image.size == (SIZE, SIZE) and "Done: 1 image(s)" in status_text(page)
    settings = json.loads(image.info["controlnet"])
    assert settings["arch"] == "flux" and settings["base"] == "tiny_flux" and settings["seed"] == 77

    # the same settings as a POST /v1/generate body, written here (the page's own "copy as API request" is tested
    # with the UNet base in test_page.py)
    body = {"prompt": "a red cat", "base": "tiny_flux", "steps": STEPS, "guidance_scale": 0, "seed": 77}
    body.update(width=SIZE, height=SIZE, units=[{"model": "flux_canny", "image": data_uri(Image.open(cond))}])
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    from controlnet.serve.images import decode_image

    api_image = np.asarray(decode_image(response.json()["images"][0], "api").convert("RGB"))
    assert (api_image == np.asarray(image.convert("RGB"))).all(), "the page and the API gave different pixels"
    assert foreign == [], f"the page reached beyond loopback: {foreign}"

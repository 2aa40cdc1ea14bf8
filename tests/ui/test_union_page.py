"""A unit's union type on the web page: the form's value is the schema's `ControlUnit.control_type` (generate/options.py)
in the job, the API body and the settings sent back to the form (no browser); and in headless chromium against a real
server, the selector appears for a union net, hides for a plain one, and the page's image with a type picked equals
what /v1/generate returns with that `control_type` (the serve tests tie /v1 to the web-UI API and `run_job`)."""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest
from PIL import Image

from controlnet.generate.options import ControlUnit
from controlnet.settings_cli import meta
from controlnet.ui.form import (
    NO_UNION_TYPE,
    UNIT_FIELD_KEYS,
    UNIT_KEYS,
    api_request,
    build_job,
    form_from_settings,
    union_type_choices,
    unit_key,
)

NETS = ["builtin:canny", "union_tiny"]


def form(**values) -> dict:
    unit = {"enabled": True, "model": "union_tiny", "annotator": "none", "scale": 1.0, "start": 0.0, "end": 1.0}
    unit |= {"map": Image.new("RGB", (8, 8)), "mode": "balanced", "resize": "just_resize"}
    base = {"prompt": "p", "steps": 2, "seed": 7, "batch_size": 1, "sampler": "base default", "init": None}
    return base | {unit_key(0, k): v for k, v in unit.items()} | values


def test_every_unit_field_the_page_shows_is_a_unit_form_key():
    """The unit fields with ui=True in the schema (control_type among them) each have a control in every unit."""
    shown = {f.name for f in dataclasses.fields(ControlUnit) if meta(f, "ui", True)}
    assert "control_type" in shown
    assert {UNIT_FIELD_KEYS.get(name, name) for name in shown} <= set(UNIT_KEYS)


def test_the_union_type_travels_from_the_form_to_the_job_the_api_body_and_back():
    values = [value for _, value in union_type_choices()]
    assert values[0] == NO_UNION_TYPE and {"openpose", "depth", "canny", "segment", "repaint", "blur"} <= set(
        values
    )
    assert len(values) == len(set(values))
    job = build_job(form(**{unit_key(0, "control_type"): "canny"}), "builtin")
    assert job.units[0].control_type == "canny"
    assert api_request(job)["units"][0]["control_type"] == "canny"
    settings = {"controlnets": [{"model": "union_tiny", "control_type": "Hard Edge"}]}  # the web UI's name
    assert form_from_settings(settings, NETS)[unit_key(0, "control_type")] == "canny"  # its entry on the page
    none = build_job(form(**{unit_key(0, "control_type"): NO_UNION_TYPE}), "builtin")
    assert none.units[0].control_type is None and "control_type" not in api_request(none)["units"][0]
    back = form_from_settings({"controlnets": [{"model": "builtin:canny"}]}, NETS)
    assert back[unit_key(0, "control_type")] == NO_UNION_TYPE


# -------------------------------------------------------------------------------------------------------------
SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def union_server(tmp_path_factory):
    import torch

    from controlnet.generate.base import load_base
    from controlnet.io.api import save_controlnet
    from controlnet.model.union_controlnet import UnionControlNet
    from controlnet.testing.live_server import start_server
    from controlnet.testing.tiny_models import randomize

    models = tmp_path_factory.mktemp("union_page_models")
    base = load_base("builtin")
    torch.manual_seed(3)
    net = UnionControlNet.from_unet(
        base.unet, num_control_type=6, num_trans_head=4, hint_downscale_factor=base.vae_scale_factor
    )
    save_controlnet(randomize(net, seed=3), models / "union_tiny")
    srv = start_server(models, tmp_path_factory.mktemp("ui-server") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.mark.slow  # chromium and a server with the page
def test_union_type_on_the_page_equals_the_api(chromium, union_server, tmp_path):
    context = chromium.new_context(viewport={"width": 1400, "height": 1800})
    try:
        _generate_with_a_union_type(context.new_page(), union_server, tmp_path)
    finally:
        context.close()


def _generate_with_a_union_type(page, union_server, tmp_path) -> None:
    from browser import choose, decode, image_bytes, open_page, set_number, status_text, upload

    from controlnet.ui.form import data_uri

    page.set_default_timeout(60_000)
    cond = tmp_path / "cond.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(cond)
    foreign = open_page(page, union_server.url)
    selector = page.locator("#unit0_control_type")
    choose(page, "unit0_model", "builtin:seg")
    selector.wait_for(state="hidden")  # a plain net: no union type
    choose(page, "unit0_model", "union_tiny")
    selector.wait_for(state="visible")
    choose(page, "unit0_control_type", "segment")
    page.locator("#prompt textarea").fill("a red cat")
    for elem_id, value in (("steps", STEPS), ("seed", 77), ("width", SIZE), ("height", SIZE)):
        set_number(page, elem_id, value)
    upload(page, "unit0_map", cond)
    page.wait_for_selector("#unit0_map img")
    page.locator("#generate").click()
    png, _ = image_bytes(page, "#gallery")
    image = decode(png)
    assert "Done: 1 image(s)" in status_text(page)

    body = {"prompt": "a red cat", "steps": STEPS, "seed": 77, "width": SIZE, "height": SIZE}
    body["units"] = [{"model": "union_tiny", "image": data_uri(Image.open(cond)), "control_type": "segment"}]
    response = httpx.post(union_server.url + "/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    from controlnet.serve.images import decode_image

    api_image = np.asarray(decode_image(response.json()["images"][0], "api").convert("RGB"))
    assert (api_image == np.asarray(image.convert("RGB"))).all(), "the page and the API gave different pixels"
    assert foreign == []

"""Union ControlNets through the REAL server (subprocess, loopback): one job with a union net gives the same pixels
through /v1/generate (`control_type`), the web-UI API (`union_control_type`, the web UI's names) and `run_job`
in-process; a union net's unit without a type it knows, or a type on a plain net, is a 422 naming the field (in each
API's words) and the types the net supports, before queueing (serve/service.py `Service.check`, from the file's
header). Flux union nets (num_mode) are checked the same way against their own modes.

The models folder: the tiny canny ControlNet of the other serve tests, a 6-type union net copied from the built-in
SD1.5 base's UNet, a tiny Flux base and a 7-mode Flux union net copied from it.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from controlnet.testing.live_server import TINY_CONTROLNET, make_models_folder, start_server

SIZE = 64  # the built-in base's native size
STEPS = 2
SEED = 21
CFG = 5.0
UNION = "union_tiny"  # 6 types: openpose/pose 0 ... segment 5 (xinsir's Union)
FLUX_UNION = "flux_union"  # 7 modes: canny 0 ... lq 6 (InstantX's)
FLUX_BASE = "tiny_flux"


def write_union_models(folder):
    """The serve tests' tiny canny net, a union net on the built-in base, a tiny Flux base and a Flux union net."""
    from controlnet.generate.base import load_base
    from controlnet.io.api import save_controlnet
    from controlnet.model.transformer_controlnet import FluxControlNet
    from controlnet.model.union_controlnet import UnionControlNet
    from controlnet.testing.tiny_models import randomize
    from controlnet.testing.tiny_transformer_bases import write_flux_base

    make_models_folder(folder)
    base = load_base("builtin")
    torch.manual_seed(3)
    net = UnionControlNet.from_unet(
        base.unet, num_control_type=6, num_trans_head=4, hint_downscale_factor=base.vae_scale_factor
    )
    save_controlnet(randomize(net, seed=3), folder / UNION)
    write_flux_base(folder / FLUX_BASE)
    transformer = load_base(str(folder / FLUX_BASE)).transformer
    torch.manual_seed(4)
    FluxControlNet.from_transformer(transformer, num_layers=1, num_mode=7).save_pretrained(folder / FLUX_UNION)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_union_models(tmp_path_factory.mktemp("union_models"))


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    srv = start_server(models, tmp_path_factory.mktemp("log") / "server.log", "--no-ui")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def edges() -> Image.Image:
    """A 64 px condition map: white lines on black (what a hard-edge type reads)."""
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    draw.ellipse((12, 10, 44, 42), outline=(255, 255, 255), width=2)
    draw.line((4, 54, 60, 50), fill=(255, 255, 255), width=2)
    return image


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",")[-1]))).convert("RGB"))


COMMON = {"prompt": "a red cat", "steps": STEPS, "seed": SEED, "width": SIZE, "height": SIZE}


def native(unit: dict, **extra) -> dict:
    body = {**COMMON, "scheduler": "euler", "guidance_scale": CFG}
    return {**body, "units": [{"image": b64(edges()), **unit}], **extra}


def webui(unit: dict, title: str) -> dict:
    body = {**COMMON, "sampler_name": "Euler", "cfg_scale": CFG}
    return {
        **body,
        "alwayson_scripts": {"controlnet": {"args": [{"image": b64(edges()), "model": title, **unit}]}},
    }


def in_process(models, control_type: str) -> np.ndarray:
    """`run_job` on the built-in base and the union net, loaded here as the service loads them (one thread)."""
    from controlnet.generate.base import load_base
    from controlnet.generate.jobs import run_job
    from controlnet.generate.options import ControlUnit, GenerationJob, GenerationOptions
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.io.api import load_controlnet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = load_base("builtin")
        net = load_controlnet(models / UNION, unet=base.unet).eval().requires_grad_(False)
        pipe = ControlNetPipeline.from_components(base, [net])
        unit = ControlUnit(model=UNION, image=edges(), control_type=control_type)
        options = GenerationOptions(
            steps=STEPS, width=SIZE, height=SIZE, seed=SEED, scheduler="euler", guidance_scale=CFG
        )
        with torch.inference_mode():
            result = run_job(pipe, GenerationJob(prompt="a red cat", units=[unit], options=options))
        return np.asarray(result.images[0].convert("RGB"))
    finally:
        torch.set_num_threads(threads)


def title_of(url: str, name: str) -> str:
    titles = [m["title"] for m in httpx.get(url + "/sdapi/v1/sd-models").json()]  # bases: to find the hash form
    nets = httpx.get(url + "/controlnet/model_list").json()["model_list"]
    found = [t for t in nets if t.split(" [")[0] == name]
    assert len(found) == 1, (nets, titles)
    return found[0]


def assert_refused(answer: httpx.Response, field: str, *words: str) -> None:
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["field"] == field, problem
    detail = problem["detail"]
    assert detail.startswith(field + ": ") and len(detail.splitlines()) == 1, detail
    for word in words:
        assert word in detail, (word, detail)


# -------------------------------------------------------------------------------------------------------------
def test_union_type_gives_the_same_pixels_through_every_door(server, models):
    """/v1/generate with `control_type: canny`, the web-UI txt2img with `union_control_type: "Hard Edge"` (id 3
    both) and `run_job` in-process: the same pixels; another type changes them (the type reaches the net)."""
    served = httpx.post(server.url + "/v1/generate", json=native({"model": UNION, "control_type": "canny"}))
    assert served.status_code == 200, served.text
    first = pixels(served.json()["images"][0])
    title = title_of(server.url, UNION)
    answer = httpx.post(server.url + "/sdapi/v1/txt2img", json=webui({"union_control_type": "Hard Edge"}, title))
    assert answer.status_code == 200, answer.text
    np.testing.assert_array_equal(pixels(answer.json()["images"][0]), first)
    np.testing.assert_array_equal(in_process(models, "canny"), first)
    other = httpx.post(server.url + "/v1/generate", json=native({"model": UNION, "control_type": "depth"}))
    assert other.status_code == 200, other.text
    assert np.abs(pixels(other.json()["images"][0]).astype(int) - first).max() > 0


def test_an_annotators_type_is_the_units_type(server):
    """A unit that names no type takes its annotator's (the web UIs send the preprocessor, "Unknown" as the type):
    the canny annotator on a union net runs as type canny."""
    unit = {"model": UNION, "annotator": "canny"}
    by_annotator = httpx.post(server.url + "/v1/generate", json=native(unit))
    named = httpx.post(server.url + "/v1/generate", json=native({**unit, "control_type": "canny"}))
    assert by_annotator.status_code == 200 and named.status_code == 200, (by_annotator.text, named.text)
    np.testing.assert_array_equal(pixels(by_annotator.json()["images"][0]), pixels(named.json()["images"][0]))


@pytest.mark.parametrize(
    "unit, words",
    [
        ({"model": UNION}, ["none given", "union ControlNet of 6 types: openpose/pose 0, depth 1,", "segment"]),
        ({"model": UNION, "control_type": "repaint"}, ["got 'repaint'", "6 types"]),  # id 7: ProMax only
        ({"model": UNION, "control_type": "9"}, ["got '9'", "6 types"]),
        ({"model": UNION, "control_type": "edges"}, ["got 'edges'", "openpose/pose 0"]),
        ({"model": UNION, "annotator": "invert"}, ["none given"]),  # an annotator that names no type
        ({"model": TINY_CONTROLNET, "control_type": "canny"}, ["not a union ControlNet", "give none"]),
        ({"model": FLUX_UNION}, ["none given", "7 types: canny 0, tile 1, depth 2, blur 3"]),
        ({"model": FLUX_UNION, "control_type": "hed"}, ["got 'hed'", "7 types"]),  # a UNet union name
    ],
)
def test_bad_types_are_refused_before_queueing_naming_the_field(server, unit, words):
    flux = {"base": FLUX_BASE, "guidance_scale": 0.0, "scheduler": None}  # what a Flux base takes
    body = native(unit, **(flux if unit["model"] == FLUX_UNION else {}))
    assert_refused(httpx.post(server.url + "/v1/jobs", json=body), "units[0].control_type", *words)
    assert httpx.get(server.url + "/v1/health").json()["queue_depth"] == 0  # nothing was queued


def test_the_web_ui_api_names_its_own_field(server):
    """The same refusals on /sdapi/v1/txt2img name `alwayson_scripts.controlnet.args[k].union_control_type`."""
    field = "alwayson_scripts.controlnet.args[0].union_control_type"
    union, plain = title_of(server.url, UNION), title_of(server.url, TINY_CONTROLNET)
    for unit, title, words in (
        ({"union_control_type": "Inpaint"}, union, ["got 'Inpaint'", "6 types"]),  # id 7 on a 6-type net
        ({"union_control_type": "Unknown"}, union, ["none given", "6 types"]),  # "Unknown" = none named
        ({"union_control_type": "Hard Edge"}, plain, ["not a union ControlNet"]),
    ):
        assert_refused(httpx.post(server.url + "/sdapi/v1/txt2img", json=webui(unit, title)), field, *words)


def test_a_type_twice_in_one_fused_call_is_refused_before_queueing(server):
    """Two units of one union net with the same window and mode run as ONE call, whose type vector marks a type once:
    the same type twice is a 422 naming the second unit's control_type, nothing queued; another window runs apart."""
    body = native({"model": UNION, "control_type": "canny"})
    body["units"].append({**body["units"][0], "control_type": "3"})  # canny again, by id
    answer = httpx.post(server.url + "/v1/jobs", json=body)
    assert_refused(answer, "units[1].control_type", "units 0, 1", "'3' twice in one fused call", "type id 3")
    assert httpx.get(server.url + "/v1/health").json()["queue_depth"] == 0
    body["units"][1]["end"] = 0.5  # another control window: two calls, each with its own type vector
    assert httpx.post(server.url + "/v1/jobs", json=body).status_code in (200, 202)

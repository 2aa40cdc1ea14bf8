"""The web-UI compatible API against the REAL server (subprocess, loopback) and the REAL `webuiapi` client.

The client's documented ControlNet usage runs with only the model names changed (and the size and steps that
the 64 px built-in base takes quickly): txt2img with one and two units, img2img whose unit takes the init image,
detect, and the model / module / version lists. Control must really be applied (images differ from the same
request without units), and the same settings through /sdapi/v1/txt2img and /v1/generate give the same pixels.
"""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlnet.generate.builtin_format import builtin_dit_folder
from controlnet.testing.live_server import TINY_CONTROLNET, start_server

webuiapi = pytest.importorskip("webuiapi")

SIZE = 64  # the built-in base's native size
STEPS = 3


@pytest.fixture(scope="module")
def server(models_folder, tmp_path_factory):
    srv = start_server(models_folder, tmp_path_factory.mktemp("log") / "server.log", "--max-units", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    port = int(server.url.rsplit(":", 1)[1])
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=STEPS)


@pytest.fixture(scope="module")
def model_title(api):
    titles = [t for t in api.controlnet_model_list() if t.startswith(TINY_CONTROLNET)]
    assert len(titles) == 1, titles
    return titles[0]


def scene(seed: int = 0) -> Image.Image:
    """A 64 px picture with edges: a disk and a bar on a flat background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (SIZE, SIZE), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(10, 30, 2))
    draw.ellipse((x, y, x + 28, y + 28), fill=(255, 255, 255))
    draw.rectangle((4, 50, 60, 56), fill=(0, 0, 0))
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def raw_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def common(**extra) -> dict:
    return dict(prompt="red circle", width=SIZE, height=SIZE, seed=100, steps=STEPS, **extra)


# -------------------------------------------------------------------------------------------------------------
# lists and versions
def test_controlnet_lists(api, server, model_title):
    assert api.controlnet_version() == 3
    assert re.fullmatch(rf"{TINY_CONTROLNET} \[[0-9a-f]{{8}}\]", model_title)
    modules = api.controlnet_module_list()
    assert {"none", "canny", "mlsd", "scribble_xdog", "lineart_standard", "shuffle", "tile_resample"} <= set(
        modules
    )
    assert "softedge_hed" not in modules  # a learned annotator: no weights on this server, so not listed
    detail = httpx.get(server.url + "/controlnet/module_list").json()["module_detail"]["canny"]
    assert [s["name"] for s in detail["sliders"]] == ["Resolution", "Low Threshold", "High Threshold"]
    assert [s["value"] for s in detail["sliders"]] == [512, 100, 200]
    assert httpx.get(server.url + "/controlnet/settings").json() == {"control_net_unit_count": 2}
    types = httpx.get(server.url + "/controlnet/control_types").json()["control_types"]
    canny = types["Canny"]
    assert model_title in canny["model_list"] and canny["default_model"] in canny["model_list"]
    assert "canny" in canny["module_list"]
    # the shipped ControlNets are served out of the box, beside the --models folder's
    assert {t.split(" [")[0] for t in api.controlnet_model_list()} >= {
        "builtin:fill",
        "builtin:canny",
        TINY_CONTROLNET,
    }
    assert "controlnet m2m" in api.get_scripts()["txt2img"] and api.has_controlnet
    shipped = ["builtin", *(["builtin-dit"] if (builtin_dit_folder() / "model_index.json").is_file() else [])]
    assert [m["title"].split(" [")[0] for m in api.get_sd_models()] == shipped  # the shipped bases
    assert "Euler a" in api.util_get_sampler_names()


# -------------------------------------------------------------------------------------------------------------
# generation through webuiapi
def test_txt2img_one_unit(api, model_title):
    unit = webuiapi.ControlNetUnit(image=scene(), module="canny", model=model_title)
    result = api.txt2img(**common(controlnet_units=[unit]))
    assert len(result.images) == 2  # the image, then the detected map
    info = result.info
    assert (info["seed"], info["all_seeds"], info["width"], info["height"]) == (100, [100], SIZE, SIZE)
    assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["batch_size"]) == ("Euler a", 3, 7.0, 1)
    assert info["sd_model_name"] == "builtin" and re.fullmatch(r"[0-9a-f]{8}", info["sd_model_hash"])
    text = info["extra_generation_params"]["ControlNet 0"]
    # webuiapi's defaults: processor_res 512, thresholds 64 / 64 (in canny's range, so used as given)
    assert text.startswith(f"Module: canny, Model: {model_title}, Weight: 1.0, Resize Mode: Resize and Fill, ")
    assert "Processor Res: 512, Threshold A: 64, Threshold B: 64, Guidance Start: 0.0, Guidance End: 1.0" in text
    assert "Pixel Perfect: False, Control Mode: Balanced" in text
    assert "ControlNet 0: " in info["infotexts"][0] and "Seed: 100" in info["infotexts"][0]
    assert result.images[0].info["parameters"] == info["infotexts"][0]  # the PNG carries its infotext
    edges = pixels(result.images[1])
    assert edges.max() > 0 and (edges == 0).mean() > 0.5  # an edge map: dark, with some edges
    assert result.parameters["alwayson_scripts"]["ControlNet"]["args"][0]["image"] is None  # no image echoed

    plain = api.txt2img(**common())
    assert len(plain.images) == 1 and plain.info["seed"] == 100
    assert np.abs(pixels(plain.images[0]) - pixels(result.images[0])).mean() > 1.0  # control is applied


def test_txt2img_two_units(api, model_title):
    units = [
        webuiapi.ControlNetUnit(image=scene(0), module="canny", model=model_title, weight=0.8),
        webuiapi.ControlNetUnit(
            image=scene(1),
            module="scribble_xdog",
            model=model_title,
            threshold_a=20,
            control_mode=2,
            guidance_end=0.5,
        ),
    ]
    result = api.txt2img(**common(controlnet_units=units))
    assert len(result.images) == 3
    extra = result.info["extra_generation_params"]
    assert "Module: canny" in extra["ControlNet 0"] and "Weight: 0.8" in extra["ControlNet 0"]
    assert "Module: scribble_xdog" in extra["ControlNet 1"] and "Threshold A: 20" in extra["ControlNet 1"]
    assert "Control Mode: ControlNet is more important" in extra["ControlNet 1"]
    assert "Guidance End: 0.5" in extra["ControlNet 1"]
    one = api.txt2img(**common(controlnet_units=units[:1]))
    assert np.abs(pixels(one.images[0]) - pixels(result.images[0])).mean() > 0.5  # the second unit counts


def test_img2img_unit_takes_init_image(api, model_title):
    init = scene(2)
    unit = webuiapi.ControlNetUnit(module="canny", model=model_title)  # no image: takes init_images[0]
    args = dict(
        images=[init], prompt="blue circle", width=SIZE, height=SIZE, seed=7, steps=4, denoising_strength=0.8
    )
    result = api.img2img(**args, controlnet_units=[unit])
    assert len(result.images) == 2 and result.info["denoising_strength"] == 0.8
    explicit = api.img2img(
        **args, controlnet_units=[webuiapi.ControlNetUnit(image=init, module="canny", model=model_title)]
    )
    np.testing.assert_array_equal(pixels(result.images[0]), pixels(explicit.images[0]))
    plain = api.img2img(**args)
    assert len(plain.images) == 1
    assert np.abs(pixels(plain.images[0]) - pixels(result.images[0])).mean() > 1.0


def test_detect(api):
    from controlnet.annotate.registry import get_annotator

    image = scene(3)
    r = api.controlnet_detect([image], module="canny")  # webuiapi sends `controlnet_images`, data URIs
    assert r.info == "Success" and len(r.images) == 1
    expected = get_annotator("canny", detect_resolution=512, low_threshold=64, high_threshold=64)(
        np.asarray(image)
    )
    np.testing.assert_array_equal(np.asarray(r.images[0].convert("RGB")), expected)
    r2 = api.custom_post(
        "controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [raw_b64(image)]}
    )
    assert len(r2.images) == 1  # the upstream key, raw base64, -1 defaults (100 / 200)


# -------------------------------------------------------------------------------------------------------------
# same pixels as the native API
def test_same_pixels_as_native_generate(server, model_title):
    image = raw_b64(scene(4))
    webui = {
        "prompt": "red circle",
        "negative_prompt": "blue",
        "seed": 11,
        "steps": STEPS,
        "cfg_scale": 5.0,
        "width": SIZE,
        "height": SIZE,
        "sampler_name": "Euler",
        "alwayson_scripts": {
            "controlnet": {
                "args": [
                    {
                        "enabled": True,
                        "image": image,
                        "module": "canny",
                        "model": model_title,
                        "weight": 0.9,
                        "resize_mode": "Crop and Resize",
                        "processor_res": 128,
                        "threshold_a": 50,
                        "threshold_b": 150,
                        "guidance_start": 0.0,
                        "guidance_end": 1.0,
                        "control_mode": "Balanced",
                    },
                ]
            }
        },
    }
    native = {
        "prompt": "red circle",
        "negative_prompt": "blue",
        "seed": 11,
        "steps": STEPS,
        "guidance_scale": 5.0,
        "width": SIZE,
        "height": SIZE,
        "scheduler": "euler",
        "units": [
            {
                "model": TINY_CONTROLNET,
                "image": image,
                "annotator": "canny",
                "scale": 0.9,
                "annotator_options": {"detect_resolution": 128, "low_threshold": 50, "high_threshold": 150},
                "resize_mode": "crop_and_resize",
                "mode": "balanced",
            }
        ],
    }
    a = httpx.post(server.url + "/sdapi/v1/txt2img", json=webui, timeout=120)
    b = httpx.post(server.url + "/v1/generate", json=native, timeout=120)
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    first = Image.open(io.BytesIO(base64.b64decode(a.json()["images"][0])))
    other = b.json()["images"][0]
    other = Image.open(io.BytesIO(base64.b64decode(other.split(",", 1)[-1] if isinstance(other, str) else other)))
    np.testing.assert_array_equal(pixels(first), pixels(other))


# -------------------------------------------------------------------------------------------------------------
# every alias and enum clients send
def test_aliases_and_enums(server, model_title):
    image = raw_b64(scene(5))
    units = [
        {
            "input_image": image.rstrip("="),
            "module": "canny",
            "model": TINY_CONTROLNET.upper(),
            "resize_mode": 0,
            "control_mode": 1,
            "processor_res": -1,
            "threshold_a": -1,
            "threshold_b": 999,
            "guidance": 0.7,
            "lowvram": True,
            "is_ui": False,
            "input_mode": "simple",
            "loopback": False,
            "output_dir": "",
        },
        {
            "enabled": True,
            "image": {"image": "data:image/png;base64," + image, "mask": None},
            "module": "Canny",
            "model": model_title,
            "resize_mode": "Inner Fit (Scale to Fit)",
            "guessmode": True,
            "save_detected_map": False,
            "processor_res": -100,
        },
        {"enabled": False, "model": "no such model", "module": "no such module"},  # skipped
    ]
    body = {
        "prompt": "x",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "seed": 3,
        "alwayson_scripts": {"ControlNet": {"args": units}},
    }
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2  # one image + one map (the second unit saves none)
    extra = __import__("json").loads(r.json()["info"])["extra_generation_params"]
    assert (
        "Resize Mode: Just Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200" in extra["ControlNet 0"]
    )
    assert "Guidance End: 0.7" in extra["ControlNet 0"] and "My prompt is more important" in extra["ControlNet 0"]
    assert "Resize Mode: Crop and Resize, Processor Res: 512" in extra["ControlNet 1"]
    assert "ControlNet is more important" in extra["ControlNet 1"]


def test_seed_minus_one_and_n_iter(api, model_title):
    result = api.txt2img(prompt="x", width=SIZE, height=SIZE, steps=1, seed=-1, n_iter=2)
    seed = result.info["seed"]
    assert seed >= 0 and result.info["all_seeds"] == [seed, seed + 1] and len(result.images) == 2


def test_inpaint_only_uses_init_image_and_mask(server, model_title):
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    body = {
        "init_images": ["data:image/png;base64," + raw_b64(scene(6))],
        "mask": raw_b64(mask),
        "prompt": "x",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "seed": 1,
        "send_images": True,
        "alwayson_scripts": {"ControlNet": {"args": [{"module": "inpaint_only", "model": model_title}]}},
    }
    r = httpx.post(server.url + "/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2 and r.json()["parameters"]["init_images"] == [None]
    r = httpx.post(server.url + "/sdapi/v1/img2img", json={**body, "mask": None}, timeout=60)
    assert r.status_code == 422 and "with a mask" in r.json()["detail"]


# -------------------------------------------------------------------------------------------------------------
# refusals: 4xx problem+json naming unit and field; the server keeps serving
def _bomb() -> str:
    from bad_images import bomb_png

    return base64.b64encode(bomb_png()).decode()


ARGS = "alwayson_scripts.ControlNet.args"


@pytest.mark.parametrize(
    ("unit", "top", "status", "field", "words"),
    [
        ({"model": "nope"}, {}, 422, f"{ARGS}[0].model", "unknown model 'nope'"),
        ({"module": "depth_leres"}, {}, 422, f"{ARGS}[0].module", "unknown module"),
        ({"module": "ip-adapter_clip_sd15"}, {}, 422, f"{ARGS}[0].module", "IP-Adapter"),
        ({"model": "ip-adapter_sd15 [6a3f2c1e]"}, {}, 422, f"{ARGS}[0].model", "IP-Adapter"),
        ({"module": "softedge_hed"}, {}, 422, f"{ARGS}[0].module", "learned annotator"),
        ({"image": "not base64 at all!"}, {}, 422, f"{ARGS}[0].image", "base64"),
        ({"image": "iVBORw0KGgoAAAANSUhEUgAA"}, {}, 422, f"{ARGS}[0].image", "image"),
        ({"image": "/etc/hosts"}, {}, 422, f"{ARGS}[0].image", "file path"),
        ({"image": "C:\\Users\\me\\in.png"}, {}, 422, f"{ARGS}[0].image", "file path"),
        ({"image": None}, {}, 422, f"{ARGS}[0].image", "no image"),
        ({"resize_mode": 7}, {}, 422, f"{ARGS}[0].resize_mode", "resize mode"),
        ({"control_mode": "louder"}, {}, 422, f"{ARGS}[0].control_mode", "control mode"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, {}, 422, f"{ARGS}[0].guidance_start", "start <= end"),
        ({"threshold_a": 200, "threshold_b": 100}, {}, 422, f"{ARGS}[0].threshold_b", "high_threshold"),
        ({}, {"enable_hr": True}, 422, "enable_hr", "hires fix"),
        ({}, {"restore_faces": True}, 422, "restore_faces", "face restoration"),
        ({}, {"tiling": True}, 422, "tiling", "tiling"),
        ({}, {"script_name": "x/y/z plot"}, 422, "script_name", "x/y/z plot"),
        ({}, {"override_settings": {"sd_vae": "x"}}, 422, "override_settings.sd_vae", "not available"),
        ({}, {"sampler_name": "DPM++ SDE"}, 422, "sampler_name", "DPM++ SDE"),
        ({"image": "BOMB"}, {}, 413, f"{ARGS}[0].image", "pixels"),
        # numbers that are not finite, or past the limits the native API has too (serve/limits.py)
        ({"weight": float("nan")}, {}, 422, f"{ARGS}[0].weight", "finite"),
        ({"weight": float("inf")}, {}, 422, f"{ARGS}[0].weight", "finite"),
        ({"weight": 1e308}, {}, 422, f"{ARGS}[0].weight", "[0.0, 10.0]"),
        ({"guidance_end": float("nan")}, {}, 422, f"{ARGS}[0].guidance_end", "finite"),
        ({}, {"cfg_scale": float("nan")}, 422, "cfg_scale", "[0.0, 50.0]"),
        ({}, {"steps": 151}, 422, "steps", "[1, 150]"),
        ({}, {"width": 4096}, 422, "width", "[1, 2048]"),
        ({}, {"batch_size": 9}, 422, "batch_size", "[1, 8]"),
        ({}, {"prompt": "x" * 20_001}, 422, "prompt", "at most 20,000"),
        ({}, {"alwayson_scripts": {"Other": 5}}, 422, "alwayson_scripts.Other", "args list"),
    ],
)
def test_bad_unit_requests(server, model_title, unit, top, status, field, words):
    image = raw_b64(scene())
    full = {"image": image, "module": "canny", "model": model_title, **unit}
    if full["image"] == "BOMB":
        full["image"] = _bomb()
    body = {
        "prompt": "x",
        "width": SIZE,
        "height": SIZE,
        "steps": 1,
        "alwayson_scripts": {"ControlNet": {"args": [full]}},
        **top,
    }
    # json.dumps writes NaN and Infinity as the bare tokens web-UI clients (Python's json) send; httpx would refuse
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    r = httpx.post(server.url + "/sdapi/v1/txt2img", content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["field"] == field and words in problem["detail"], problem
    assert httpx.get(server.url + "/controlnet/version").json() == {"version": 3}  # still serving


def test_no_page_or_answer_can_be_framed_by_another_site(server):
    """Every response, the page's, the APIs', a refusal and a 404, forbids framing (clickjacking)."""
    responses = [
        httpx.get(server.url + "/ui/", follow_redirects=True, timeout=60),
        httpx.get(server.url + "/v1/health"),
        httpx.get(server.url + "/sdapi/v1/nothing-here"),
        httpx.post(server.url + "/v1/generate", content=b"x", headers={"content-type": "text/plain"}),
    ]
    assert [r.status_code for r in responses] == [200, 200, 404, 415]
    for r in responses:
        assert r.headers["content-security-policy"] == "frame-ancestors 'none'", r.url
        assert r.headers["x-frame-options"] == "DENY", r.url


def test_too_many_units_and_bad_init(server, model_title):
    unit = {"image": raw_b64(scene()), "module": "canny", "model": model_title}
    body = {
        "prompt": "x",
        "width": SIZE,
        "height": SIZE,
        "steps": 1,
        "alwayson_scripts": {"ControlNet": {"args": [unit] * 3}},
    }
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == ARGS and "limit of 2" in r.json()["detail"]
    r = httpx.post(server.url + "/sdapi/v1/img2img", json={"init_images": ["/srv/photo.png"]}, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]" and "file path" in r.json()["detail"]
    r = httpx.post(
        server.url + "/controlnet/detect", json={"controlnet_module": "nope", "controlnet_images": [unit["image"]]}
    )
    assert r.status_code == 422 and r.json()["field"] == "controlnet_module"
    r = httpx.post(server.url + "/controlnet/detect", json={"controlnet_module": "canny"})
    assert r.status_code == 422 and r.json()["field"] == "controlnet_images"
    assert httpx.get(server.url + "/v1/health").status_code == 200


def test_options_samplers_progress_interrupt(api, server):
    options = api.get_options()
    assert options["sd_model_checkpoint"].startswith("builtin [")
    assert (
        api.set_options({"sd_model_checkpoint": "builtin"})["sd_model_checkpoint"]
        == options["sd_model_checkpoint"]
    )
    assert httpx.post(server.url + "/sdapi/v1/options", json=options).status_code == 200  # a round trip is fine
    r = httpx.post(server.url + "/sdapi/v1/options", json={"samples_format": "jpg"})
    assert r.status_code == 422 and r.json()["field"] == "samples_format"
    r = httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint"
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert httpx.post(server.url + "/sdapi/v1/interrupt").status_code == 200
    assert httpx.get(server.url + "/sdapi/v1/cmd-flags").status_code == 404


# -------------------------------------------------------------------------------------------------------------
# advanced_weighting: one scale per output of the unit's net (ControlUnit.block_scales)
@pytest.fixture(scope="module")
def num_outputs(models_folder) -> int:
    """The tiny net's outputs (its skips + the middle block), read from the loaded model, not the server."""
    from controlnet import load_controlnet

    return load_controlnet(models_folder / TINY_CONTROLNET).num_control_outputs


def _weighted(model_title: str, **unit) -> dict:
    args = [{"image": raw_b64(scene(7)), "module": "canny", "model": model_title, **unit}] if unit else []
    return {
        "prompt": "red circle",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "seed": 9,
        "alwayson_scripts": {"ControlNet": {"args": args}},
    }


def _first_image(server, body: dict) -> np.ndarray:
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))


def test_advanced_weighting_scales_each_output(server, model_title, num_outputs):
    assert num_outputs > 2
    plain = _first_image(server, _weighted(model_title))  # no unit
    unweighted = _first_image(server, _weighted(model_title, weight=1.0))
    assert np.abs(unweighted - plain).mean() > 1.0  # the net acts
    null = _first_image(server, _weighted(model_title, advanced_weighting=None))
    np.testing.assert_array_equal(null, unweighted)  # null = no weighting
    ones = _first_image(server, _weighted(model_title, advanced_weighting=[1.0] * num_outputs))
    np.testing.assert_array_equal(ones, unweighted)
    zeros = _first_image(server, _weighted(model_title, advanced_weighting=[0] * num_outputs))
    assert np.abs(zeros - plain).mean() < np.abs(unweighted - plain).mean() / 10  # every output off: ~no control
    middle_only = [0.0] * (num_outputs - 1) + [1.0]
    weighted = _first_image(server, _weighted(model_title, advanced_weighting=middle_only))
    assert np.abs(weighted - unweighted).mean() > 0.5 and np.abs(weighted - zeros).mean() > 0.5


@pytest.mark.parametrize("kind", ["one too many", "one too few", "not numbers", "not a list"])
def test_advanced_weighting_of_the_wrong_shape_is_a_422(server, model_title, num_outputs, kind):
    value = {
        "one too many": [1.0] * (num_outputs + 1),
        "one too few": [1.0] * (num_outputs - 1),
        "not numbers": ["a"] * num_outputs,
        "not a list": 1.0,
    }[kind]
    r = httpx.post(
        server.url + "/sdapi/v1/txt2img", json=_weighted(model_title, advanced_weighting=value), timeout=60
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["field"] == f"{ARGS}[0].advanced_weighting", problem
    assert f"{num_outputs} numbers" in problem["detail"], problem


@pytest.mark.parametrize(
    ("resize", "mode", "labels"),
    [
        (2, 0, ("Resize Mode: Resize and Fill", "Control Mode: Balanced")),
        (
            "Outer Fit (Shrink to Fit)",
            "My prompt is more important",
            ("Resize Mode: Resize and Fill", "prompt is"),
        ),
        ("Scale to Fit (Inner Fit)", "ControlNet is more important", ("Crop and Resize", "ControlNet is more")),
        ("Envelope (Outer Fit)", 1, ("Resize Mode: Resize and Fill", "My prompt is more important")),
        ("just resize", "balanced", ("Resize Mode: Just Resize", "Control Mode: Balanced")),
    ],
)
def test_every_resize_and_control_mode_spelling(server, model_title, resize, mode, labels):
    body = _weighted(model_title, resize_mode=resize, control_mode=mode)
    body["steps"] = 1
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    text = __import__("json").loads(r.json()["info"])["extra_generation_params"]["ControlNet 0"]
    assert all(label in text for label in labels), text

"""The web page end to end in headless chromium against a real server: photo -> canny map -> image; strength 0
changes the image; the page's image equals the API's for the same settings; a PNG's settings go back into the
form; the page asks nothing of any host but the server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from browser import choose, decode, draw_stroke, image_bytes, number, open_page, set_number, status_text, upload
from PIL import Image, ImageDraw

from controlnet.generate.jobs import annotate_image

STEPS = 4


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A small 'photo' with edges for canny to find (non-square: the output size follows it)."""
    image = Image.new("RGB", (320, 256), (40, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((32, 32, 176, 176), fill=(220, 200, 40))
    draw.rectangle((192, 80, 296, 232), fill=(200, 40, 40))
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    image.save(path)
    return path


def prepare(page, server, photo, prompt="a yellow ball and a red box"):
    foreign = open_page(page, server.url)
    page.locator("#prompt textarea").fill(prompt)
    set_number(page, "steps", STEPS)
    upload(page, "unit0_photo", photo)
    page.wait_for_selector("#unit0_photo img")  # shown, i.e. uploaded (the page also copes without this wait)
    choose(page, "unit0_annotator", "canny")
    return foreign


def generate(page, previous=None) -> tuple[bytes, str]:
    page.locator("#generate").click()
    return image_bytes(page, "#gallery", previous)


def test_photo_to_canny_map_to_image(page, server, photo, tmp_path):
    foreign = prepare(page, server, photo)
    data, _ = image_bytes(page, "#unit0_map")
    shown = np.asarray(decode(data).convert("RGB"))
    expected = np.asarray(annotate_image(Image.open(photo), "canny", {"detect_resolution": 512}).convert("RGB"))
    assert shown.shape == expected.shape and (shown == expected).all(), "the map is not canny of the photo"
    assert 0 < (shown > 0).mean() < 0.5  # edges, not a blank or full image

    png, src = generate(page)
    image = decode(png)
    assert image.format == "PNG" and image.width > image.height  # the size follows the condition's aspect
    assert "Module: canny" in image.info["parameters"] and "Steps: 4" in image.info["parameters"]
    assert "Done: 1 image(s)" in status_text(page)
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    # strength 0: the ControlNet is not run, so the image changes (the built-in canny net is trained: non-zero)
    set_number(page, "unit0_scale", 0)
    png0, _ = generate(page, src)
    a, b = np.asarray(image.convert("RGB"), np.int16), np.asarray(decode(png0).convert("RGB"), np.int16)
    assert np.abs(a - b).mean() > 1.0, "strength 0 gave the same image"
    assert "Weight: 0.0" in decode(png0).info["parameters"]
    assert foreign == [], f"the page reached beyond loopback: {foreign}"


def test_page_image_equals_api_image(page, server, photo):
    prepare(page, server, photo)
    image_bytes(page, "#unit0_map")
    set_number(page, "seed", 1234)
    png, _ = generate(page)
    page.locator("#copy_api").click()
    page.wait_for_function("() => document.querySelector('#api_request .cm-content')?.innerText.includes('units')")
    body = json.loads(page.locator("#api_request .cm-content").inner_text())
    assert body["seed"] == 1234 and body["units"][0]["annotator"] == "canny"
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    from controlnet.serve.images import decode_image

    api_image = np.asarray(decode_image(response.json()["images"][0], "api").convert("RGB"))
    ui_image = np.asarray(decode(png).convert("RGB"))
    assert (api_image == ui_image).all(), "the page and the API gave different pixels for the same settings"


def test_png_settings_back_into_the_form(page, server, photo, tmp_path):
    """A PNG generated with other settings (through the API) fills the form when dropped on the page."""
    from controlnet.generate.png_settings import read_png_settings
    from controlnet.serve.images import decode_bytes
    from controlnet.ui.form import data_uri

    condition = annotate_image(Image.open(photo), "canny", {})
    body = {
        "prompt": "settings from a file",
        "seed": 4321,
        "steps": 3,
        "guidance_scale": 6.5,
        "scheduler": "euler_a",
        "units": [
            {
                "model": "builtin:canny",
                "image": data_uri(condition),
                "scale": 0.65,
                "start": 0.1,
                "end": 0.8,
                "mode": "prompt",
            }
        ],
    }
    response = httpx.post(server.url + "/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    file = tmp_path / "made-elsewhere.png"
    file.write_bytes(decode_bytes(response.json()["images"][0], "image"))
    assert read_png_settings(file.read_bytes())["seed"] == 4321

    open_page(page, server.url)
    upload(page, "png_drop", file)
    page.wait_for_function("() => document.querySelector('#prompt textarea').value === 'settings from a file'")
    assert number(page, "seed") == 4321
    assert number(page, "steps") == 3
    assert number(page, "cfg") == 6.5
    assert number(page, "unit0_scale") == 0.65
    assert number(page, "unit0_start") == 0.1 and number(page, "unit0_end") == 0.8
    assert page.locator("#unit0_mode input[value=prompt]").is_checked()
    assert page.locator("#sampler input").first.input_value() == "Euler a"
    assert "settings from a file" in page.locator("#settings").inner_text()


def test_bad_png_is_one_clear_message(page, server, tmp_path):
    file = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(file)
    open_page(page, server.url)
    upload(page, "png_drop", file)
    toast = page.locator(".toast-body, [data-testid=toast-body]").first
    toast.wait_for()
    assert "no generation settings in it" in toast.inner_text()


def test_the_page_annotator_has_the_api_limits(page, server, tmp_path):
    """Defect: the page's annotator skipped the API's limits; a 1x1024 photo asked canny for 512x524288 pixels
    (over 4 GB). Refused in one message, before any annotator runs."""
    file = tmp_path / "thin.png"
    Image.new("RGB", (1024, 1), "white").save(file)
    open_page(page, server.url)
    choose(page, "unit0_annotator", "canny")
    upload(page, "unit0_photo", file)
    toast = page.locator(".toast-body, [data-testid=toast-body]").first
    toast.wait_for()
    assert "512x524288" in toast.inner_text()
    assert server.peak_rss_mb() < 2048


@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_drawn_scribble_becomes_the_map_and_painted_strokes_the_mask(page, server, photo):
    open_page(page, server.url)
    page.get_by_text("Draw a scribble").first.click()
    draw_stroke(page, "unit0_sketch")
    page.locator("#unit0_use_sketch").click()
    data, _ = image_bytes(page, "#unit0_map")
    drawn = np.asarray(decode(data).convert("L"))
    assert 0 < (drawn > 128).mean() < 0.2, "the map is not white strokes on black"

    # inpainting: the init image with a stroke painted on it; unit 1 off, so the mask alone decides
    page.locator("#unit0_enabled input[type=checkbox]").uncheck()
    page.get_by_text("img2img / inpainting").first.click()
    upload(page, "init", photo)
    page.wait_for_function("() => document.querySelectorAll('#init canvas').length > 0")
    draw_stroke(page, "init")
    set_number(page, "steps", STEPS)
    set_number(page, "width", 64)  # the built-in base's size (an init image alone keeps its own 320 x 256)
    set_number(page, "height", 48)
    png, _ = generate(page)
    settings = json.loads(decode(png).info["controlnet"])
    assert settings["inpainting"] is True and settings["strength"] == 0.75
    assert (settings["width"], settings["height"]) == (64, 48)

"""Driving the page in headless chromium: Debian's binary through playwright's `executable_path` (never
`playwright install`, which downloads a browser build), and the few page actions the tests repeat.

Every control has an `elem_id` (ui/page.py); gradio renders it as the id of the component's outer element."""

from __future__ import annotations

import io
import shutil
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from playwright.sync_api import Page, sync_playwright

CHROMIUM_NAMES = ("chromium", "chromium-browser", "chromium-headless-shell")
# no GPU, no sandbox (root in CI), and none of chromium's own calls home (updates, sync, metrics)
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--metrics-recording-only"]  # fmt: skip
LOOPBACK_PREFIXES = ("http://127.0.0.1", "http://localhost", "ws://127.0.0.1", "data:", "blob:", "about:")


def chromium_path() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no chromium binary on PATH: the test set-up installs it (apt-get install -y chromium)")


@contextmanager
def launch():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(page: Page, url: str) -> list[str]:
    """Load the page; returns the list that collects every request that leaves loopback (it must stay empty)."""
    foreign: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(LOOPBACK_PREFIXES) else foreign.append(r.url))
    page.goto(url + "/ui/", wait_until="load")
    page.wait_for_selector("#generate")
    return foreign


def upload(page: Page, elem_id: str, file: Path) -> None:
    page.locator(f"#{elem_id} input[type=file]").first.set_input_files(str(file))


def choose(page: Page, elem_id: str, value: str) -> None:
    """Pick `value` in a gradio dropdown."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.locator("ul[role=listbox] li", has_text=value).first.click()


def set_number(page: Page, elem_id: str, value) -> None:
    """Set a slider's or number box's value through its number input (fires change and release)."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def number(page: Page, elem_id: str) -> float:
    return float(page.locator(f"#{elem_id} input[type=number]").first.input_value())


def image_bytes(
    page: Page, selector: str, previous: str | None = None, timeout_ms: int = 120_000
) -> tuple[bytes, str]:
    """The bytes of the first <img> under `selector` once its src differs from `previous`; (bytes, src)."""
    img = page.locator(f"{selector} img").first
    page.wait_for_function(
        "([sel, prev]) => { const i = document.querySelector(sel + ' img'); return i && i.src && i.src !== prev; }",
        arg=[selector, previous],
        timeout=timeout_ms,
    )
    src = img.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, f"{src}: {response.status}"
    return response.body(), src


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def status_text(page: Page) -> str:
    return page.locator("#status").inner_text()


def draw_stroke(page: Page, elem_id: str) -> None:
    """Pick the brush of the image editor `elem_id` and draw one diagonal stroke across its canvas's middle."""
    page.locator(f"#{elem_id} button[aria-label=Brush]").first.click()
    box = page.locator(f"#{elem_id} canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy - 40)
    page.mouse.down()
    for i in range(25):
        page.mouse.move(cx - 60 + i * 5, cy - 40 + i * 3, steps=2)
    page.mouse.up()

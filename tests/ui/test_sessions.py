"""The page under load and behind the server's safety settings: 20 concurrent sessions get images or "Busy" and
the server lives on; cancel stops a running generation; --auth guards the page too; --no-ui leaves it out."""

from __future__ import annotations

import time

import httpx
import pytest
from browser import open_page, set_number, status_text
from playwright.sync_api import Error as PlaywrightError

from controlnet.testing.live_server import start_server

SESSIONS = 20


def txt2img_ready(context, url: str, steps: int):
    """A page set up for a text-to-image generation (unit 1 off), not yet clicked."""
    page = context.new_page()
    page.set_default_timeout(120_000)
    open_page(page, url)
    page.locator("#prompt textarea").fill("a red circle")
    set_number(page, "steps", steps)
    page.locator("#unit0_enabled input[type=checkbox]").uncheck()
    return page


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("ui-busy") / "server.log"
    srv = start_server(None, log, "--max-queue", "2")
    yield srv
    assert srv.stop() == 0, log.read_text()


@pytest.mark.slow  # the default suite's 15-minute budget; run with -m slow
def test_twenty_sessions_get_images_or_busy(chromium, small_queue_server):
    srv = small_queue_server
    contexts = [chromium.new_context() for _ in range(SESSIONS)]  # a context each: 20 separate sessions
    try:
        # 30 steps (~1 s a job here): slower than the clicks come, so the queue of 2 fills on any machine
        pages = [txt2img_ready(ctx, srv.url, steps=30) for ctx in contexts]
        for page in pages:
            page.locator("#generate").click()
        outcomes = []
        deadline = time.monotonic() + 300
        for page in pages:
            page.wait_for_function(
                "() => /^(Done|Busy)/.test(document.querySelector('#status').innerText.trim())",
                timeout=max(1, deadline - time.monotonic()) * 1000,
            )
            outcomes.append(status_text(page).split(":")[0].strip())
    finally:
        for ctx in contexts:
            ctx.close()
    assert set(outcomes) <= {"Done", "Busy"} and len(outcomes) == SESSIONS
    assert outcomes.count("Done") >= 3, outcomes  # the running job and the 2 queued ones at least
    assert outcomes.count("Busy") >= 1, outcomes  # 20 at once cannot all fit a queue of 2
    assert srv.alive()
    health = httpx.get(srv.url + "/v1/health", timeout=10).json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    print(
        f"outcomes: {outcomes.count('Done')} images, {outcomes.count('Busy')} busy; peak RSS {srv.peak_rss_mb():.0f} MB"
    )


def test_cancel_stops_a_running_generation(chromium, small_queue_server):
    srv = small_queue_server
    context = chromium.new_context()
    try:
        page = txt2img_ready(context, srv.url, steps=150)
        set_number(page, "width", 256)  # 16x the built-in's 64 px pixels: 150 steps take a minute, not 3 s
        set_number(page, "height", 256)
        page.locator("#generate").click()
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/v1/health", timeout=10).json()["running"] is None:
            assert time.monotonic() < deadline, "the generation never started"
            time.sleep(0.2)
        time.sleep(1.0)  # a few steps in
        started = time.monotonic()
        page.locator("#cancel").click()
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('Cancelled')")
        took = time.monotonic() - started
    finally:
        context.close()
    assert took < 30, f"cancel took {took:.1f} s"  # one step is well under a second here; 150 steps would be ~30+
    assert httpx.get(srv.url + "/v1/health", timeout=10).json()["running"] is None


def test_auth_guards_the_page(chromium, tmp_path):
    srv = start_server(None, tmp_path / "server.log", "--auth", "alice:s3cret", auth=("alice", "s3cret"))
    try:
        assert httpx.get(srv.url + "/ui/", timeout=10).status_code == 401
        stranger = chromium.new_context()  # no credentials: chromium gets the 401 and cannot answer it
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            stranger.new_page().goto(srv.url + "/ui/")
        stranger.close()
        context = chromium.new_context(http_credentials={"username": "alice", "password": "s3cret"})
        page = txt2img_ready(context, srv.url, steps=2)
        page.locator("#generate").click()  # the page's queue calls carry the same credentials
        page.wait_for_function("() => document.querySelector('#status').innerText.startsWith('Done')")
        context.close()
    finally:
        assert srv.stop() == 0


def test_no_ui_serves_only_the_apis(tmp_path):
    srv = start_server(None, tmp_path / "server.log", "--no-ui")
    try:
        assert httpx.get(srv.url + "/ui/", timeout=10).status_code == 404
        assert httpx.get(srv.url + "/", timeout=10).status_code == 404
        assert httpx.get(srv.url + "/v1/health", timeout=10).status_code == 200
    finally:
        assert srv.stop() == 0

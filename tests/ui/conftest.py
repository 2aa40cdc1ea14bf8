"""Fixtures of the web page tests: a REAL `controlnet serve` (controlnet.testing.live_server) and Debian's chromium
driven by playwright. The README's test set-up installs both; a missing browser fails these tests (it is not a
reason to skip them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # browser

pytest.importorskip("gradio")

from browser import launch  # noqa: E402

from controlnet.testing.live_server import start_server  # noqa: E402


@pytest.fixture(scope="session")
def chromium():
    with launch() as browser:
        yield browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The built-in base and ControlNets, the page at /ui/."""
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    srv = start_server(None, log)
    yield srv
    assert srv.stop() == 0, log.read_text()


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(viewport={"width": 1400, "height": 1800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()

"""Fixtures of the server tests: one tiny models folder per session (a ControlNet copied from the built-in base).

Each test module starts its own REAL server (controlnet.testing.live_server) in a module-scoped fixture."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from controlnet.testing.live_server import make_models_folder  # noqa: E402


@pytest.fixture(scope="session")
def models_folder(tmp_path_factory):
    return make_models_folder(tmp_path_factory.mktemp("models"))

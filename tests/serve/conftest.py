"""Fixtures of the server tests: one tiny models folder per session (a ControlNet copied from the built-in base).

Each test module starts its own REAL server (live_server.py) in a module-scoped fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # lets test modules import live_server

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from live_server import make_models_folder  # noqa: E402


@pytest.fixture(scope="session")
def models_folder(tmp_path_factory):
    return make_models_folder(tmp_path_factory.mktemp("models"))

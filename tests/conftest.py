"""Shared pytest fixtures. The tiny random models they build on live in controlnet.testing.tiny_models."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlnet.testing.tiny_models import TINY_UNET_CONFIGS

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"  # the reference fixtures beside the checkout


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches a test writes (the server's model hashes) go to a folder of this session, never the user's."""
    import os

    os.environ["CONTROLNET_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"reference fixtures not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(params=sorted(TINY_UNET_CONFIGS))
def family(request) -> str:
    return request.param

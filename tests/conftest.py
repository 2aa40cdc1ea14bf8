"""Shared pytest fixtures. Helper functions live in tests/tiny.py (on sys.path via pyproject's pythonpath)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import SHARED_DIR, TINY_UNET_CONFIGS


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"reference fixtures not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(params=sorted(TINY_UNET_CONFIGS))
def family(request) -> str:
    return request.param

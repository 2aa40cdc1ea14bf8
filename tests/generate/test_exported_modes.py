"""A base exported in the built-in folder format (`controlnet world export-base`) is readable by other users as any
file we write: its weights follow the umask (diffusers' save_pretrained creates them 0600 through safetensors)."""

from __future__ import annotations

import os
import stat

import pytest
from pipeline_tiny import save_random_builtin_base

from controlnet.world.fill import FILL_VOCABULARY


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_an_exported_base_s_weights_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        save_random_builtin_base(tmp_path / "base", FILL_VOCABULARY)
    finally:
        os.umask(old)
    weights = sorted((tmp_path / "base").rglob("*.safetensors"))
    assert len(weights) == 3  # unet, vae, text encoder
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in weights}
    assert modes == {name: oct(0o666 & ~mask) for name in modes}

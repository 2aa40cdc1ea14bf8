"""Every weights file we write is created with the user's umask (0644 by default, not safetensors' 0600), flushed
to disk and renamed into place; `controlnet init` keeps the base UNet's dtype by default, as convert and transfer."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from controlnet.cli import main
from controlnet.io.api import save_controlnet
from controlnet.io.lite import save_lite
from controlnet.io.safe_load import write_state_dict
from controlnet.model.controlnet import ControlNet
from controlnet.model.lite import ControlNetLite
from controlnet.testing.ldm_files import write_unet_file
from controlnet.testing.tiny_models import TINY_UNET_CONFIGS, make_tiny_unet
from controlnet.train.checkpoint import CheckpointData, save_checkpoint


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of every file under `root` (or of `root` itself, a file)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in files}


def tiny_unet_file(path: Path, dtype=torch.float32) -> Path:
    return write_unet_file(path, TINY_UNET_CONFIGS["sd15"], dtype=dtype)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_weights_file_we_write_follows_the_umask(tmp_path, unet_config, mask):
    expected = 0o666 & ~mask
    unet = make_tiny_unet("sd15")
    net = ControlNet.from_unet(unet)
    with umask(mask):
        written = [
            save_controlnet(net, tmp_path / "diffusers", format="diffusers"),
            save_controlnet(net, tmp_path / "original.safetensors", format="original"),
            save_controlnet(net, tmp_path / "original.pth", format="original"),
            save_lite(ControlNetLite.from_unet(unet), tmp_path / "lite"),
            save_checkpoint(tmp_path / "run", 1, CheckpointData({"controlnet": net.state_dict()}, {}, {}, {}), 1),
        ]
        base = tiny_unet_file(tmp_path / "base.safetensors")
        assert main(["init", str(base), str(tmp_path / "init"), "--config", str(unet_config)]) == 0
        written.append(tmp_path / "init")
        path = tmp_path / "init_original.safetensors"
        assert main(["init", str(base), str(path), "--to", "original", "--config", str(unet_config)]) == 0
        written.append(path)
    found = {}
    for path in written:
        found.update(modes(Path(path)))
    weights = [name for name in found if name.endswith((".safetensors", ".pth", ".pt"))]
    assert len(weights) >= 8, found
    assert {name: mode for name, mode in found.items() if mode != expected} == {}, oct(expected)
    leftovers = [p for p in tmp_path.rglob(".*") if p.name not in (".", "..")]
    assert leftovers == []  # every write renamed into place, no hidden temporary left


def test_weights_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    import controlnet.atomic as atomic

    flushed = []
    real = atomic.fsync_path
    monkeypatch.setattr(atomic, "fsync_path", lambda p: (flushed.append(Path(p)), real(p)))
    write_state_dict({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    save_controlnet(ControlNet.from_unet(make_tiny_unet("sd15")), tmp_path / "cn", format="diffusers")
    names = [p.name for p in flushed]
    assert "w.safetensors" in names and "diffusion_pytorch_model.safetensors" in names
    assert flushed[names.index("w.safetensors")] != tmp_path / "w.safetensors"  # the temporary, before the rename


def _dtypes(path: Path) -> set[torch.dtype]:
    file = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
    with safe_open(str(file), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def test_init_keeps_an_fp16_base_s_dtype_by_default(tmp_path, unet_config):
    base = tiny_unet_file(tmp_path / "fp16.safetensors", dtype=torch.float16)
    config = ["--config", str(unet_config)]
    assert main(["init", str(base), str(tmp_path / "keep"), *config]) == 0
    assert _dtypes(tmp_path / "keep") == {torch.float16}
    assert main(["init", str(base), str(tmp_path / "fp32"), *config, "--dtype", "fp32"]) == 0
    assert _dtypes(tmp_path / "fp32") == {torch.float32}
    fp32_base = tiny_unet_file(tmp_path / "fp32.safetensors")
    assert main(["init", str(fp32_base), str(tmp_path / "keep32"), *config]) == 0
    assert _dtypes(tmp_path / "keep32") == {torch.float32}

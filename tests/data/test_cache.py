"""Latent and text caches: reused when nothing changed, rebuilt when the data or the model changed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from train_helpers import tiny_config  # noqa: E402
from train_tiny import make_fill_dataset, make_tiny_base  # noqa: E402

from controlnet.train.trainer import Trainer  # noqa: E402


def _cache_folders(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.name.startswith("latents-")}


def _setup(data, out, cache, base):
    trainer = Trainer(tiny_config(data, out, data__cache_dir=cache), base)
    trainer.setup()
    return trainer


def test_latent_cache_holds_the_vae_posterior_and_invalidates_itself(tmp_path):
    torch.set_num_threads(1)
    data = make_fill_dataset(tmp_path / "data", n=6)
    cache = tmp_path / "cache"
    base = make_tiny_base(latent=True)
    trainer = _setup(data, tmp_path / "a", cache, base)
    first = _cache_folders(cache)
    assert len(first) == 1
    mean, std, cond = trainer.data.latents.get(0)
    pixels, cond_ref = trainer.data.pixels.load(0, 0)
    dist = base.vae.encode(pixels[None]).latent_dist
    torch.testing.assert_close(mean, dist.mean[0])
    torch.testing.assert_close(std, dist.std[0])
    assert torch.equal(cond, cond_ref) and mean.shape == (4, 8, 8)

    _setup(data, tmp_path / "b", cache, base)  # nothing changed: the same cache is reused
    assert _cache_folders(cache) == first
    edited = tmp_path / "edited"
    shutil.copytree(data, edited)
    shutil.copy(data / "target" / "1.png", edited / "target" / "0.png")  # one image changed
    _setup(edited, tmp_path / "c", cache, base)
    assert len(_cache_folders(cache)) == 2
    other = make_tiny_base(latent=True, seed=7)  # another VAE
    _setup(data, tmp_path / "d", cache, other)
    assert len(_cache_folders(cache)) == 3


def test_random_augmentation_bypasses_the_latent_cache(tmp_path):
    data = make_fill_dataset(tmp_path / "data", n=6)
    trainer = Trainer(tiny_config(data, tmp_path / "run", data__random_flip=True), make_tiny_base())
    trainer.setup()
    assert trainer.data.latents is None and trainer.data.text is not None


def test_cache_files_take_the_users_umask(tmp_path):
    """safetensors writes 0600; a cache folder shared with a process of another user (a web UI's) must be readable."""
    import os

    data = make_fill_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    old = os.umask(0o022)
    try:
        _setup(data, tmp_path / "run", cache, make_tiny_base(latent=True))
    finally:
        os.umask(old)
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}
